"""The front door's .proto files and the code grpcio-tools generates from them (``make grpc``;
never edited by hand)."""
