"""Optional integrations with other Flask extensions, each imported only when its library is."""
