"""The Open Inference Protocol's gRPC messages and service (``inference.GRPCInferenceService``).

``grpc_predict_v2.proto`` is the source; the ``*_pb2*`` modules are generated from it by
``hack/gen-grpc`` (never edit them; a unit test fails when they drift). Their descriptors live in a
private descriptor pool, so other packages defining the same ``inference.*`` messages (tritonclient,
kserve) can be imported into the same process.
"""
