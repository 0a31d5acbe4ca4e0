"""The reading page: a browser page at ``/reader/`` on the MONAI Label server (``page.py``), what it draws
(``viewer.py``), its exports (``export.py``) and its words in Chinese and English (``texts.py``)."""
