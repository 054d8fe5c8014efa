"""The front door's .proto files and the code grpcio-tools generates from them (``make grpc``;
never edited by hand), and the descriptor pool that code registers its messages in."""

from google.protobuf.descriptor_pool import DescriptorPool

POOL = DescriptorPool()
"""The door's own pool, apart from protobuf's default one, where tritonclient.grpc and KServe
register their own ``inference.*`` messages under the same names."""
