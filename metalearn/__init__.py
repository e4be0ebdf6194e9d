"""metalearn."""
