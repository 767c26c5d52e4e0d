"""The demo programme that `jifen demo` builds on the embedded database."""
