"""Reading the JSON manifests that describe record sets and feature sets."""

import json

from brats_tf.errors import DataError
from brats_tf.io import files as fs


def read_manifest(folder, name, what, how_to_make, version_key, version):
    """The manifest `folder/name` as a dict; DataError (naming the file) when it is missing,
    not JSON, or of another format version. `how_to_make` completes "no <what> manifest
    here; ..."."""
    path = fs.join(folder, name)
    try:
        if not fs.isfile(path):   # a URL's GFile raises only when read
            raise FileNotFoundError(path)
        with fs.open_file(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DataError(path, f"no {what} manifest here; {how_to_make}") from None
    except json.JSONDecodeError as err:
        raise DataError(path, f"{what} manifest is not valid JSON ({err.msg})") from None
    except UnicodeDecodeError:
        raise DataError(path, f"{what} manifest is not UTF-8 text") from None
    if not isinstance(manifest, dict):
        raise DataError(path, f"{what} manifest is not a JSON object")
    if manifest.get(version_key) != version:
        raise DataError(path, f"{what} {version_key} {manifest.get(version_key)} is not {version}; "
                              f"{how_to_make}")
    return manifest
