"""./run.sh demo: the gateway in front of a local fake provider, no real keys, nothing sent off the machine."""
