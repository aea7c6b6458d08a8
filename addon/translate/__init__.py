"""Translation pairs (inbound API x provider API): pure request, response and stream mappings."""
