"""The face model: how a camera frame becomes a name or "unknown".

Detection (BlazeFace, Haar fallback), alignment to dlib's chip, the backbone
(dlib's ResNet on LiteRT), the federated head and its training step, the open-set
decision and the threshold's calibration, doorbell conditions for benchmarks, and
synthetic faces for tests. It may import the wire contract's tensor types
(`fedbell.wire.codecs`) and the shared helpers; the contract never imports it.
"""
