"""fedbell's shared contract: topics, envelope, codecs, model, configuration."""
