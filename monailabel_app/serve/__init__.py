"""Serving: the MONAI Label server, its guards, datastores (folder, PACS), conversations, the reading page."""
