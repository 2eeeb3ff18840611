"""What is learned and how it is measured: data sources, collates and task logic. Uses `model`."""
