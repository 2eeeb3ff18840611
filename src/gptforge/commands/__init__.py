"""CLI verb implementations, one module per area; each verb parses its own arguments."""
