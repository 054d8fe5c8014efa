"""The gRPC front door: the Open Inference Protocol's ``inference.GRPCInferenceService`` (and the
standard health check) over the same inference service as the REST doors."""
