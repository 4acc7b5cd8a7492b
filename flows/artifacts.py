"""``lm-sleep artifacts``: list, fetch and open runs in the artifact store; DVC's remote on its bucket.

The store is the one ``store.store_from_env`` picks (S3 when ``LM_SLEEP_S3_BUCKET``
is set, else ``artifacts/``). Mount the commands with :func:`add_artifacts_parser`, or run
``python -m flows.artifacts {list,fetch,open,flush,dvc-remote} ...``.
"""

from __future__ import annotations

import argparse
import sys
import webbrowser
from pathlib import Path
from typing import Any

from store import (
    ArtifactStore,
    PublishResult,
    S3Store,
    StoreError,
    fetch_run,
    flush_outbox,
    list_runs,
    outbox_for,
    run_prefix,
    store_from_env,
)

DVC_REMOTE = "lm-sleep"


def cmd_list(run_id: str | None = None, store: ArtifactStore | None = None) -> list[str]:
    """Print the runs (id, cycles, last accuracy), or with ``run_id`` every artifact of that run."""
    store = store or store_from_env()
    if run_id is None:
        lines = [
            f"{r['run_id']}\tcycles={len(r.get('cycles') or [])}\tlast_mean_accuracy={r.get('last_mean_accuracy_seen')}"
            for r in sorted(list_runs(store), key=lambda r: r["run_id"])
        ]
        print("\n".join(lines) if lines else f"no runs in {store.uri}")
        return lines
    lines = []
    for key in store.list(run_prefix(run_id)):
        info = store.stat(key)
        lines.append(f"{key}\t{info.size if info else '?'}\t{(info.sha256 or '-')[:12] if info else '-'}")
    print("\n".join(lines) if lines else f"no artifacts for run {run_id!r} in {store.uri}")
    return lines


def cmd_fetch(
    run_id: str, dest: str | Path, cycle: int | None = None, store: ArtifactStore | None = None
) -> list[Path]:
    """Download a run (or one cycle) into ``dest``, checksum-verified; prints where its index is."""
    store = store or store_from_env()
    paths = fetch_run(store, run_id, dest, cycle)
    print(f"fetched {len(paths)} file(s) of run {run_id} into {dest}; open {Path(dest) / 'index.html'}")
    return paths


def cmd_open(
    run_id: str | None = None, store: ArtifactStore | None = None, dest: str | Path | None = None, browser: bool = True
) -> str:
    """Print the location of a run's index.html (or the root index) and open it in a browser.

    Local store: the file itself. S3: a presigned HTTPS URL (one hour); its relative links
    need a public or website-enabled bucket, so ``dest`` fetches the run there and opens
    the local copy instead, where every link works.
    """
    store = store or store_from_env()
    key = f"{run_prefix(run_id)}index.html" if run_id else "index.html"
    if dest is not None:
        if run_id is None:
            raise ValueError("--dest needs a run id")
        cmd_fetch(run_id, dest, store=store)
        location = (Path(dest) / "index.html").resolve().as_uri()
    elif store.stat(key) is None:
        raise StoreError(f"no {key} in {store.uri} (nothing published yet?)")
    elif isinstance(store, S3Store):
        print(store.url(key))
        location = store.presigned_url(key)
    else:
        location = store.url(key)
    print(location)
    if browser:
        webbrowser.open(location)
    return location


def cmd_flush(root: str | Path = ".", store: ArtifactStore | None = None) -> PublishResult:
    """Send uploads that earlier runs left queued (store unreachable, access denied, killed)."""
    store = store or store_from_env(root)
    result = flush_outbox(store, outbox_for(root))
    print(f"{store.uri}: {len(result.uploaded)} uploaded, {len(result.unchanged)} already there, "
          f"{len(result.indexes)} index page(s) written")
    return result


def dvc_remote_url(store: S3Store) -> str:
    """DVC's remote beside the runs: ``s3://BUCKET/PREFIX/dvc``."""
    return f"{store.uri}/dvc"


def cmd_dvc_remote(repo: str | Path = ".", name: str = DVC_REMOTE, store: ArtifactStore | None = None) -> str:
    """Make ``name`` (on the artifact bucket) DVC's default remote, in ``.dvc/config.local``.

    Only the URL and the endpoint are written there (never committed: ``.dvc/.gitignore``
    lists config.local); DVC reads credentials and region from the same AWS chain as boto3.
    """
    store = store or store_from_env(repo)
    if not isinstance(store, S3Store):
        raise StoreError("LM_SLEEP_S3_BUCKET is not set: DVC's remote lives on the artifact bucket")
    from dvc.repo import Repo

    url = dvc_remote_url(store)
    remote: dict[str, Any] = {"url": url}
    if store.endpoint_url:
        remote["endpointurl"] = store.endpoint_url
    with Repo(str(repo)) as dvc_repo, dvc_repo.config.edit("local") as conf:
        conf.setdefault("remote", {})[name] = remote
        conf.setdefault("core", {})["remote"] = name
    print(f"DVC remote '{name}' -> {url}" + (f" at {store.endpoint_url}" if store.endpoint_url else ""))
    return url


def _run(args: argparse.Namespace) -> Any:
    """Dispatch a parsed ``artifacts`` command."""
    if args.artifacts_cmd == "list":
        return cmd_list(args.run_id)
    if args.artifacts_cmd == "fetch":
        return cmd_fetch(args.run_id, args.dest, args.cycle)
    if args.artifacts_cmd == "open":
        return cmd_open(args.run_id, dest=args.dest, browser=not args.no_browser)
    if args.artifacts_cmd == "flush":
        return cmd_flush(args.root)
    return cmd_dvc_remote(args.repo, args.name)


def _command(args: argparse.Namespace) -> int:
    """The parser's ``func``: run the command; its exit status is 0 (a failure raises a StoreError).

    ``lm-sleep`` turns ``func``'s return value into the exit status, so the command's own result
    (a list of lines, a PublishResult) must not be that value."""
    _run(args)
    return 0


def add_artifacts_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``artifacts {list,fetch,open,flush,dvc-remote}`` to an argparse subparsers object."""
    ap = subparsers.add_parser("artifacts", help="list, fetch and open runs in the artifact store")
    sub = ap.add_subparsers(dest="artifacts_cmd", required=True)
    p = sub.add_parser("list", help="the runs, or the artifacts of one run")
    p.add_argument("run_id", nargs="?")
    p = sub.add_parser("fetch", help="download a run (checksum-verified)")
    p.add_argument("run_id")
    p.add_argument("dest", type=Path)
    p.add_argument("--cycle", type=int)
    p = sub.add_parser("open", help="print and open a run's index.html (or the list of runs)")
    p.add_argument("run_id", nargs="?")
    p.add_argument("--dest", type=Path, help="fetch the run here and open the local copy")
    p.add_argument("--no-browser", action="store_true")
    p = sub.add_parser("flush", help="send uploads left queued by earlier runs")
    p.add_argument("--root", type=Path, default=Path("."))
    p = sub.add_parser("dvc-remote", help="make the artifact bucket DVC's default remote (.dvc/config.local)")
    p.add_argument("--repo", type=Path, default=Path("."))
    p.add_argument("--name", default=DVC_REMOTE)
    ap.set_defaults(func=_command)
    return ap


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.artifacts ...``; store errors end with their message and exit code 1."""
    parser = argparse.ArgumentParser(prog="lm-sleep")
    add_artifacts_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["artifacts", *(argv if argv is not None else sys.argv[1:])])
    try:
        args.func(args)
    except StoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
