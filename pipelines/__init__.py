"""One module per DVC stage: parse params, call components, write outputs atomically."""
