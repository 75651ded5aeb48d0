"""The fedbell doorbell node: recognises visitors, trains locally, sends updates."""
