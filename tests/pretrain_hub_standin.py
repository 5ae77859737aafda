"""Run examples/run_pretraining.py with `huggingface_hub.HfApi` replaced by a local stand-in of the Hub.

Usage: python tests/pretrain_hub_standin.py <record_dir> <script args...>

`create_repo` records the repo; `upload_folder` fails once (to exercise the retries), then copies the folder
(minus `ignore_patterns`) to `<record_dir>/<repo_id>/<path_in_repo>`, as the Hub would store it.

`STANDIN_UPLOAD=down` makes every upload fail with a (transient) connection error instead, with the retry
back-off shortened to milliseconds: a run whose push never succeeds.
"""

import fnmatch
import os
import runpy
import shutil
import sys
from pathlib import Path

import huggingface_hub

RECORD = Path(sys.argv[1])
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "run_pretraining.py"
UPLOAD_MODE = os.environ.get("STANDIN_UPLOAD", "flaky")
calls = {"upload": 0}


class _RepoUrl(str):
    repo_id = None


def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None, **kwargs):
    (RECORD / repo_id).mkdir(parents=True, exist_ok=True)
    (RECORD / "create_repo.txt").write_text(f"{repo_id} private={private}\n")
    url = _RepoUrl(f"https://huggingface.co/{repo_id}")
    url.repo_id = repo_id
    return url


def upload_folder(self, repo_id, folder_path, path_in_repo=None, commit_message=None, ignore_patterns=None,
                  repo_type=None, **kwargs):
    calls["upload"] += 1
    if calls["upload"] == 1 or UPLOAD_MODE == "down":
        raise ConnectionError("simulated network failure")
    target = RECORD / repo_id / (path_in_repo or "")
    for root, _, files in os.walk(folder_path):
        for name in files:
            src = Path(root) / name
            rel = src.relative_to(folder_path).as_posix()
            if any(fnmatch.fnmatch(rel, pat) for pat in (ignore_patterns or [])):
                continue
            dst = target / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    with open(RECORD / "commits.txt", "a") as f:
        f.write(f"{commit_message}\n")
    return f"https://huggingface.co/{repo_id}/commit/0"


huggingface_hub.HfApi.create_repo = create_repo
huggingface_hub.HfApi.upload_folder = upload_folder
if UPLOAD_MODE == "down":
    from simmim_hf.training_utils import HubPusher

    _init = HubPusher.__init__

    def _fast_retries(self, *args, **kwargs):
        kwargs.setdefault("backoff_seconds", 0.01)
        _init(self, *args, **kwargs)

    HubPusher.__init__ = _fast_retries
sys.argv = [str(SCRIPT), *sys.argv[2:]]
runpy.run_path(str(SCRIPT), run_name="__main__")
