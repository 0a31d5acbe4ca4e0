"""The MONAI Label app, shipped inside the package so that a wheel install serves it as a checkout does.

``APP_DIR`` is the folder MONAI Label's ``start_server --app`` is given: its ``main.py`` defines the app
(``MyApp``), ``configs/`` the models it can serve, ``infers/`` their infer tasks. MONAI Label writes its
``logs/`` (and empty ``model/``, ``lib/``, ``bin/``) into that folder when it starts.
"""

import os

APP_DIR = os.path.dirname(os.path.abspath(__file__))
