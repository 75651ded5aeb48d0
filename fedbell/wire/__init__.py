"""The wire contract: everything that defines or checks a message on MQTT.

Topics, the binary envelope and its codecs, the typed messages built on them,
the JSON protocol messages, signing, safe JSON parsing and the MQTT session. A
doorbell and the aggregator agree on exactly this and nothing else. It may import
`fedbell.errors`, `fedbell.config` and `fedbell.redact`, never `fedbell.faces`:
the contract must not change when the face model does.
"""
