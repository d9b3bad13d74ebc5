"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), on its own
port, through the same data plane as the REST routes."""

from .server import GrpcServer

__all__ = ["GrpcServer"]
