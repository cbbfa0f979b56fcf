"""Small shared helpers: config validation, manifests."""
