"""MONAI Label's folder datastore with crash-safe writes.

MONAI Label rewrites its index (``.lock``-guarded ``datastore_v2.json``) in place and copies a saved
label straight to its final name: a kill in the middle leaves a truncated index (every label's info lost
on the next start) or a truncated label file that looks saved. Here both are written to a temporary file
in the same folder, flushed to disk and renamed over the old one, so a reader sees the old or the new
file, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageNotFoundException, LocalDatastore

from ..io.writers import replace_atomically

logger = logging.getLogger(__name__)


class SafeLocalDatastore(LocalDatastore):
    def _update_datastore_file(self, lock=True):
        def write_index():
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            replace_atomically(self._datastore_config_path, lambda f: f.write(text.encode()))
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write_index()
        else:
            write_index()

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        """As MONAI Label's, with the label file and the index each replaced atomically."""
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise ImageNotFoundException(f"Image {image_id} not found")
        _, label_ext = self._to_id(os.path.basename(label_filename))
        label_path = self._datastore.label_path(label_tag)
        name = self._filename(image_id, label_ext)
        with FileLock(self._lock_file):
            os.makedirs(label_path, exist_ok=True)
            with open(label_filename, "rb") as src:
                replace_atomically(os.path.join(label_path, name), lambda f: shutil.copyfileobj(src, f))
            info = dict(label_info or {})
            info.update(ts=int(time.time()), name=name)
            obj.labels[label_tag] = DataModel(info=info, ext=label_ext)
            self._update_datastore_file(lock=False)
        return image_id
