"""MONAI Label's usual entry for a checkout: ``start_server --app .`` loads this file.

The app itself ships inside the package (``monailabel_app/app/main.py``), so that a wheel install serves
the same app: ``medgemma-label serve`` points MONAI Label there directly.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # monailabel_app from a checkout

from monailabel_app.app.main import MyApp  # noqa: E402,F401  (MONAI Label looks for its subclass here)
