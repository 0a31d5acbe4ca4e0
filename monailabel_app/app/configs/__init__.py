"""Models the app can serve: each module's TaskConfig subclass, named after the module."""
