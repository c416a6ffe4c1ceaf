"""Hugging Face Hub uploads of checkpoints and states, and resuming from a state on the Hub (sd-scripts' options).

Uploads never endanger a run: a failed upload is logged with the file it concerns (the local file is kept) and
training goes on. With --async_upload a checkpoint is uploaded from a file opened before the upload starts, so
--save_last_n_* may delete the path meanwhile without breaking it; state folders and the final file are uploaded
before the trainer moves on.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

logger = logging.getLogger(__name__)


class HubError(ValueError):
    """A Hub option that cannot work, with a message for the user."""


class HubUploader:
    def __init__(self, args):
        self.repo_id = args.huggingface_repo_id
        self.repo_type = args.huggingface_repo_type or "model"
        self.path_in_repo = (args.huggingface_path_in_repo or "").strip("/")
        self.token = args.huggingface_token
        self.private = (args.huggingface_repo_visibility or "private") != "public"
        self.asynchronous = bool(getattr(args, "async_upload", False))
        self.upload_states = bool(getattr(args, "save_state_to_huggingface", False))
        self._threads: list[threading.Thread] = []
        self._repo_ready = False

    @classmethod
    def from_args(cls, args) -> "HubUploader | None":
        return cls(args) if getattr(args, "huggingface_repo_id", None) else None

    def _api(self):
        import huggingface_hub

        return huggingface_hub.HfApi(token=self.token)

    def _remote(self, path: Path) -> str:
        return f"{self.path_in_repo}/{path.name}" if self.path_in_repo else path.name

    def _ensure_repo(self, api) -> None:
        if not self._repo_ready:
            api.create_repo(self.repo_id, repo_type=self.repo_type, private=self.private, exist_ok=True)
            self._repo_ready = True

    def upload(self, path: Path, final: bool = False) -> None:
        """Upload a checkpoint file (in the background with --async_upload, unless final) or a state folder."""
        path = Path(path)
        if path.is_dir():
            if self.upload_states:
                self._run(self._upload_folder, path)
            return
        if self.asynchronous and not final:
            handle = open(path, "rb")  # the upload reads this even if --save_last_n_* removes the path
            thread = threading.Thread(target=self._run, args=(self._upload_file, path, handle), daemon=False)
            thread.start()
            self._threads.append(thread)
        else:
            self._run(self._upload_file, path)

    def wait(self) -> None:
        """Wait for background uploads (before the process ends)."""
        for thread in self._threads:
            thread.join()
        self._threads.clear()

    def _run(self, fn, path: Path, *extra) -> None:
        try:
            fn(path, *extra)
            logger.info("uploaded %s to %s/%s", path, self.repo_id, self._remote(path))
        except Exception as e:  # noqa: BLE001 - any upload failure: keep training, keep the local file
            logger.error("uploading %s to the Hugging Face repo %s failed (the local copy is kept): %s", path,
                         self.repo_id, e)

    def _upload_file(self, path: Path, handle=None) -> None:
        api = self._api()
        self._ensure_repo(api)
        try:
            api.upload_file(path_or_fileobj=handle if handle is not None else str(path),
                            path_in_repo=self._remote(path), repo_id=self.repo_id, repo_type=self.repo_type)
        finally:
            if handle is not None:
                handle.close()

    def _upload_folder(self, path: Path) -> None:
        api = self._api()
        self._ensure_repo(api)
        api.upload_folder(folder_path=str(path), path_in_repo=self._remote(path), repo_id=self.repo_id,
                          repo_type=self.repo_type)


def parse_hub_resume(spec: str) -> tuple[str, str, str | None, str]:
    """`repo_owner/repo_name/path[:revision[:repo_type]]` -> (repo_id, path, revision, repo_type)."""
    location, *rest = spec.split(":")
    parts = location.strip("/").split("/")
    if len(parts) < 3 or not all(parts) or len(rest) > 2:
        raise HubError(f"--resume {spec}: with --resume_from_huggingface, give repo_owner/repo_name/path"
                       "[:revision[:repo_type]] (the state folder's path inside the repo)")
    revision = (rest[0] or None) if rest else None
    repo_type = rest[1] if len(rest) == 2 and rest[1] else "model"
    return "/".join(parts[:2]), "/".join(parts[2:]), revision, repo_type


def download_state(spec: str, token: str | None) -> Path:
    """Download a state folder from the Hub; returns its local path (in the Hub cache)."""
    import huggingface_hub

    repo_id, path, revision, repo_type = parse_hub_resume(spec)
    try:
        root = huggingface_hub.snapshot_download(repo_id, repo_type=repo_type, revision=revision,
                                                 allow_patterns=[f"{path}/*"], token=token)
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: one message
        raise HubError(f"--resume {spec}: downloading the state from the Hugging Face Hub failed: {e}") from None
    local = Path(root) / path
    if not local.is_dir():
        raise HubError(f"--resume {spec}: the repo {repo_id} has no folder {path}")
    logger.info("downloaded the state %s from %s to %s", path, repo_id, local)
    return local
