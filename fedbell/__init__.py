"""fedbell's shared code, in two packages and a few helpers.

- `fedbell.wire`: the contract both sides speak (topics, envelope, codecs, messages,
  signing, the MQTT session). What is on the wire is defined and checked here.
- `fedbell.faces`: the face model a doorbell computes and a benchmark scores
  (detection, alignment, backbone, head, open-set decision, calibration).
- Helpers beside them: configuration loading (`config`), errors (`errors`),
  log redaction (`redact`) and systemd notification (`systemd`).

`fedbell.wire` never imports `fedbell.faces`; `tests/test_layers.py` keeps it so.
"""
