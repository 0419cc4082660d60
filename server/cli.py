"""`memguard serve`, `memguard client …` and `memguard apikey`.

    memguard serve                                   # testbed model (+ index if built) on 127.0.0.1:50051
    memguard serve --config memguard.toml --port 8443
    memguard client generate --server 127.0.0.1:50051 --prompt "a red apple" --out out/
    memguard demo                                    # the main job: local guarded server, demo mix, images
    memguard client demo --server HOST:PORT          # the demo mix against a running server
    memguard apikey --name frontend --scopes generate,screen >> keys.toml   # the key goes to stderr only
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import urllib.parse
from pathlib import Path

from memguard.errors import InvalidInput
from memguard.types import FaceAction, GenerationRequest, GuardMode

DEFAULT_TARGET = "127.0.0.1:50051"
TESTBED_INDEX_DIR = Path(__file__).resolve().parent.parent / "guard" / "testbed" / "index"


def register(subparsers) -> None:
    _register_serve(subparsers)
    _register_client(subparsers)
    _add_server_to_generate(subparsers)
    d = subparsers.add_parser("demo", help="the main job: start a local guarded server on a testbed, send prompts "
                                           "that show every decision (ALLOWED, REROUTED, BLOCKED, FACE_OBFUSCATED), "
                                           "write the released images and a contact sheet")
    _demo_args(d, out_default=Path("out/demo"))
    d.add_argument("--timeout", type=float, help="deadline per call, seconds")
    d.set_defaults(func=_client_demo, server=None, json=False)
    p = subparsers.add_parser("apikey", help="make an API key and print its key-file entry (hash only)")
    p.add_argument("--name", required=True, help="who holds the key (shown in PERMISSION_DENIED messages)")
    p.add_argument("--scopes", default="generate,screen",
                   help="comma list of generate,screen,admin,audit,guard_override")
    p.set_defaults(func=_apikey)


# ----------------------------------------------------------------------------- serve
def _register_serve(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the gRPC service (health, reflection, Prometheus metrics)")
    p.add_argument("--config", help="TOML file: [server] [engine] [batching] [limits]; flags override it")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks one)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (default 9464; -1 disables)")
    p.add_argument("--metrics-host", help="Prometheus listen address (default 127.0.0.1; /metrics has no auth and is "
                                          "audit scope: keep it on loopback or a private network)")
    p.add_argument("--engine", help="engine factory module:attr (default memguard.guarded_engine:GuardedEngine; memguard.engine:PipelineEngine is the unguarded baseline)")
    p.add_argument("--model", help="diffusers pipeline directory (default: the testbed model)")
    p.add_argument("--index", help="fingerprint index directory (default: a testbed model's own index; "
                                   "required for any other model, as for `memguard generate`)")
    p.add_argument("--no-index", action="store_true", help="run without an index (Screen answers UNAVAILABLE)")
    p.add_argument("--registry", help="protected registry: postgresql://… shared by replicas, or sqlite:///PATH "
                                      "(default $MEMGUARD_REGISTRY, else registry.sqlite in the index directory); "
                                      "no password here (it would show in `ps`): use $MEMGUARD_REGISTRY, "
                                      "--registry-file, $PGPASSWORD or ~/.pgpass")
    p.add_argument("--registry-file", type=Path, help="file holding the registry URI (may hold a password; "
                                                     "keep it 0600)")
    p.add_argument("--policy", help="guard policy file (guarded engine; default: the model's calibrated policy)")
    p.add_argument("--tiny-random", action="store_true", help="random-weight testbed architecture (smoke tests)")
    p.add_argument("--device", help="torch device (default cpu)")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--auth-file", help="API key file (TOML/JSON, sha256 hashes); none: auth off, loopback only")
    p.add_argument("--tls-cert", help="PEM certificate chain (enables TLS with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--tls-client-ca", help="mTLS: require client certificates signed by this PEM CA")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="allow plaintext off loopback with an auth file (API keys cross the network unencrypted)")
    p.add_argument("--audit-log", help="append-only hash-chained audit log (JSONL, created 0600)")
    p.add_argument("--allow-mode-override", action="store_true", default=None,
                   help="let every generate key ask for MONITOR/OFF (default: only keys with guard_override)")
    p.add_argument("--max-batch-images", type=int, help="images per micro-batch (default 8)")
    p.add_argument("--max-queue-delay-ms", type=float, help="max wait for a batch to fill (default 10)")
    p.add_argument("--max-queue", type=int, help="admission queue size (default 64)")
    p.add_argument("--mode", choices=[m.value for m in GuardMode], help="guard mode for requests that set none")
    p.add_argument("--drain-delay", type=float, help="seconds NOT_SERVING before refusing RPCs on SIGTERM")
    p.add_argument("--grace", type=float, help="seconds in-flight RPCs get on shutdown (default 30)")
    p.set_defaults(func=_serve)


def build_config(args: argparse.Namespace):
    from memguard.server.config import load_config, override

    config = load_config(args.config)
    index = serve_index(config, args)
    return override(
        config, host=args.host, port=args.port, metrics_port=args.metrics_port, metrics_host=args.metrics_host,
        engine_spec=args.engine, auth_file=args.auth_file, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca, insecure=args.insecure, audit_log=args.audit_log,
        allow_mode_override=args.allow_mode_override,
        default_mode=GuardMode(args.mode) if args.mode else None,
        drain_delay_s=args.drain_delay, grace_s=args.grace,
        **{"engine.model": args.model, "engine.index": index, "engine.policy": args.policy,
           "engine.device": args.device,
           "engine.torch_threads": args.torch_threads, "engine.tiny_random": args.tiny_random or None,
           "batching.max_batch_images": args.max_batch_images, "batching.max_queue": args.max_queue,
           "batching.max_queue_delay_ms": args.max_queue_delay_ms})


def serve_index(config, args: argparse.Namespace) -> str | None:
    """The index `memguard serve` screens against, by the rule `memguard generate` follows: the one
    given (--index, [engine] index), else a testbed model's own index; any other model must name the
    index of its own training set, or say --no-index (Screen fails closed, every guarded image is
    BLOCKED). Never another model's index (issue 29, finding 8)."""
    from memguard.calibrate import default_index_dir

    if args.no_index:
        return None
    if args.index or config.engine.index:
        return args.index   # None keeps the config file's
    if args.tiny_random or config.engine.tiny_random:
        return None         # random weights: no index of their own
    model = args.model or config.engine.model
    index = default_index_dir(model)
    if index is None:
        raise InvalidInput("index", f"{model} is not a testbed model: give the fingerprint index of its training set "
                                    "(--index DIR or [engine] index), as `memguard generate` requires, or --no-index "
                                    "to serve with every guarded image failing closed")
    return str(index) if index.is_dir() else None


_PASSWORD_PAIR = re.compile(r"(?i)(?:^|\s)password\s*=")


def has_password(uri: str) -> bool:
    """Does a registry URI (postgresql://user:pw@… or a `key=value` conninfo) carry a password?"""
    if _PASSWORD_PAIR.search(uri) or re.search(r"(?i)[?&]password=", uri):
        return True
    try:
        return urllib.parse.urlsplit(uri).password is not None
    except ValueError:
        return False


def registry_uri(args: argparse.Namespace) -> str | None:
    """--registry-file, else --registry (refused when it holds a password: the command line is world
    readable in `ps` and /proc), else None ($MEMGUARD_REGISTRY then applies)."""
    path = getattr(args, "registry_file", None)
    if path is not None:
        try:
            uri = path.read_text().strip()
        except OSError as exc:
            raise InvalidInput("registry_file", f"cannot read {path}: {exc.strerror}") from exc
        if not uri:
            raise InvalidInput("registry_file", f"{path} is empty")
        return uri
    uri = getattr(args, "registry", None)
    if uri and has_password(uri):
        raise InvalidInput("registry", "the URI holds a password, which any local user can read in `ps`: put the "
                                       "URI in $MEMGUARD_REGISTRY or a file (--registry-file), or the password in "
                                       "$PGPASSWORD / ~/.pgpass")
    return uri or None


def _serve(args: argparse.Namespace) -> int:
    from memguard.server.app import serve_until_signal

    config = build_config(args)
    config.validate()
    registry = registry_uri(args)
    if registry:   # read by memguard.index.registry when the engine opens its index
        from memguard.index.registry import ENV_REGISTRY
        os.environ[ENV_REGISTRY] = registry
    asyncio.run(serve_until_signal(config))
    return 0


# ----------------------------------------------------------------------------- client
def _key_args(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument("--api-key", help=f"API key{what} (shows in `ps`: prefer --api-key-file or $MEMGUARD_API_KEY)")
    p.add_argument("--api-key-file", type=Path, help=f"file holding the API key{what}")


def api_key(args) -> str | None:
    """--api-key, else --api-key-file, else $MEMGUARD_API_KEY."""
    if getattr(args, "api_key", None):
        return args.api_key
    path = getattr(args, "api_key_file", None)
    if path is not None:
        try:
            key = path.read_text().strip()
        except OSError as exc:
            raise InvalidInput("api_key_file", f"cannot read {path}: {exc.strerror}") from exc
        if not key:
            raise InvalidInput("api_key_file", f"{path} is empty")
        return key
    return os.environ.get("MEMGUARD_API_KEY") or None


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=DEFAULT_TARGET, help=f"HOST:PORT (default {DEFAULT_TARGET})")
    _key_args(p)
    p.add_argument("--tls-ca", help="PEM CA file: connect with TLS")
    p.add_argument("--tls-cert", help="mTLS: client certificate (PEM)")
    p.add_argument("--tls-key", help="mTLS: client private key (PEM)")
    p.add_argument("--timeout", type=float, help="deadline per call, seconds")
    p.add_argument("--json", action="store_true", help="print JSON")


def _register_client(subparsers) -> None:
    p = subparsers.add_parser("client", help="call a running MemGuard server")
    sub = p.add_subparsers(dest="client_command", required=True, metavar="CALL")

    g = sub.add_parser("generate", help="generate images through the server")
    _connection_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--size", type=int, default=64)
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--guidance-scale", type=float, default=7.5)
    g.add_argument("--seed", type=int)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--mode", choices=[m.value for m in GuardMode], default=GuardMode.ENFORCE.value)
    g.add_argument("--face-action", choices=[a.value for a in FaceAction], default=FaceAction.BLUR.value)
    g.add_argument("--stream", action="store_true", help="print progress events per step")
    g.add_argument("--out", type=Path, help="directory for the returned PNGs")
    g.set_defaults(func=_client_generate)

    s = sub.add_parser("screen", help="screen an image file against the index")
    _connection_args(s)
    s.add_argument("image", type=Path)
    s.set_defaults(func=_client_screen)

    pr = sub.add_parser("protect", help="add an image or a face identity to the protected registry")
    _connection_args(pr)
    pr.add_argument("--image", type=Path, help="image to protect")
    pr.add_argument("--item-id", default="")
    pr.add_argument("--face-photo", type=Path, action="append", help="photo of the person (repeatable)")
    pr.add_argument("--identity", help="name of the protected identity (with --face-photo)")
    pr.add_argument("--reason", required=True)
    pr.set_defaults(func=_client_protect)

    u = sub.add_parser("unprotect", help="remove a protected-registry entry")
    _connection_args(u)
    u.add_argument("id")
    u.add_argument("--reason", required=True)
    u.set_defaults(func=_client_unprotect)

    st = sub.add_parser("stats", help="index statistics")
    _connection_args(st)
    st.set_defaults(func=_client_stats)

    h = sub.add_parser("health", help="grpc.health.v1 status")
    _connection_args(h)
    h.set_defaults(func=_client_health)

    d = sub.add_parser("demo", help="send the demo's prompts (novel, memorized compositions and photos, a face), "
                                    "print decisions (without --server: start a local server first)")
    _connection_args(d)
    d.set_defaults(server=None)
    _demo_args(d, out_default=None)
    d.set_defaults(func=_client_demo)


def _demo_args(d: argparse.ArgumentParser, out_default: Path | None) -> None:
    d.add_argument("--testbed", help="shipped testbed (eps, vpred, sdxl): its model, index, policy and prompts (default "
                                     "eps: the one with memorized compositional captions, hence REROUTED rows)")
    d.add_argument("--per-set", type=int, default=2, help="prompts per set (default 2)")
    d.add_argument("--steps", type=int, default=30)
    d.add_argument("--seed", type=int, default=0, help="seed of the requests (default 0; the face row adds its testbed's offset, demo.FACE_SEED_OFFSET)")
    d.add_argument("--out", type=Path, default=out_default, help="write the released images and contact_sheet.png "
                   "here" + (f" (default {out_default})" if out_default else ""))
    d.add_argument("--tiny-random", action="store_true", help="local server on random weights (no testbed)")


def _conn(args):
    from memguard.server.client import Connection

    return Connection(args.server, api_key(args), args.tls_ca, args.timeout,
                      getattr(args, "tls_cert", None), getattr(args, "tls_key", None))


def _print(args, payload: dict, text: str) -> None:
    print(json.dumps(payload, indent=1) if args.json else text)


def _add_server_to_generate(subparsers) -> None:
    """`memguard generate --server HOST:PORT`: the same command, answered by a running server.

    guard/generate_cli.py registers `generate` (local generation); the option is added here so that
    the library never imports the server package."""
    generate = subparsers.choices.get("generate")
    if generate is None:
        return
    generate.add_argument("--server", help="HOST:PORT of a running MemGuard server: generate there, not locally")
    _key_args(generate, " for --server")
    generate.add_argument("--tls-ca", help="PEM CA file: connect to --server with TLS")
    generate.add_argument("--timeout", type=float, help="deadline per call to --server, seconds")
    local = generate.get_default("func")

    def dispatch(args) -> int:
        if args.server is None:
            return local(args)
        for flag in ("model", "index", "policy", "trace", "audit"):
            if getattr(args, flag, None):
                raise InvalidInput(flag, "is a local-generation option; the server chooses its own")
        status = 0
        for i, prompt in enumerate(args.prompt):   # one request a prompt; images of prompt i under out/p<i>
            out = args.out if len(args.prompt) == 1 else args.out / f"p{i}"
            one = argparse.Namespace(**{**vars(args), "prompt": prompt, "size": args.size or 64, "stream": False,
                                        "out": out})
            status = max(status, _client_generate(one))
        return status

    generate.set_defaults(func=dispatch)


def _client_generate(args) -> int:
    from memguard.server.client import remote_generate
    from memguard.server.convert import encode_png

    request = GenerationRequest(prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.size,
                                width=args.size, steps=args.steps, guidance_scale=args.guidance_scale,
                                seed=args.seed, num_images=args.num_images, mode=GuardMode(args.mode),
                                face_action=FaceAction(args.face_action))
    on_progress = (lambda e: print(f"  image {e.image_index} step {e.step + 1}/{e.total_steps} "
                                   + " ".join(f"{k}={v:.3g}" for k, v in e.signals.items()))) if args.stream else None
    results = remote_generate(_conn(args), request, on_progress=on_progress)
    rows = []
    for r in results:
        path = None
        if args.out is not None and r.image is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / f"image_{r.index}_seed{r.seed}.png"
            path.write_bytes(encode_png(r.image))
        rows.append({"index": r.index, "seed": r.seed, "decision": r.decision.value, "reason": r.reason.value,
                     "steps_computed": r.report.steps_computed, "first_flagged_step": r.report.first_flagged_step,
                     "scores": r.report.scores, "path": str(path) if path else None,
                     **({"audit": r.report.audit} if r.report.audit else {})})
    text = "\n".join(f"image {x['index']} seed {x['seed']}: {x['decision']} ({x['reason']}), "
                     f"{x['steps_computed']} steps" + (f" -> {x['path']}" if x["path"] else "") for x in rows)
    _print(args, {"images": rows}, text)
    return 0


def _client_screen(args) -> int:
    from memguard.server.client import remote_screen

    o = remote_screen(_conn(args), args.image.read_bytes())
    payload = {"copy_detected": o.copy_detected, "faces_detected": o.faces_detected,
               "faces_matched": o.faces_matched, "reason": o.reason.value, **({"audit": o.audit} if o.audit else {})}
    _print(args, payload, f"{args.image}: copy={o.copy_detected} faces={o.faces_detected} "
                          f"matched={o.faces_matched} reason={o.reason.value}")
    return 0


def _client_protect(args) -> int:
    from memguard.server.client import remote_protect_face, remote_protect_image

    if bool(args.image) == bool(args.face_photo):
        raise InvalidInput("--image/--face-photo", "give exactly one of --image or --face-photo")
    if args.image:
        item = remote_protect_image(_conn(args), args.image.read_bytes(), args.reason, args.item_id)
    else:
        if not args.identity:
            raise InvalidInput("--identity", "required with --face-photo")
        item = remote_protect_face(_conn(args), [p.read_bytes() for p in args.face_photo], args.identity, args.reason)
    _print(args, {"id": item}, f"protected: {item}")
    return 0


def _client_unprotect(args) -> int:
    from memguard.server.client import remote_unprotect

    removed = remote_unprotect(_conn(args), args.id, args.reason)
    _print(args, {"removed": removed}, "removed" if removed else "not found")
    return 0


def _client_stats(args) -> int:
    from memguard.server.client import remote_index_stats

    s = remote_index_stats(_conn(args))
    _print(args, {"items": s.items, "protected_items": s.protected_items, "details": s.details},
           f"items {s.items}, protected {s.protected_items}")
    return 0


def _client_health(args) -> int:
    from memguard.server.client import health_status

    status = health_status(_conn(args))
    _print(args, {"status": status}, status)
    return 0 if status == "SERVING" else 1


def _client_demo(args) -> int:
    from memguard.server.client import Connection
    from memguard.server.demo import DEMO_TESTBED, run_demo
    from memguard.testbed.registry import get_testbed

    if args.per_set < 1:
        raise InvalidInput("per_set", f"{args.per_set} < 1")
    args.testbed = get_testbed(args.testbed or DEMO_TESTBED).name   # an unknown name: InvalidInput listing them
    demo = {"per_set": args.per_set, "steps": args.steps, "seed": args.seed, "testbed": args.testbed}
    if args.server is not None:
        return _demo_output(run_demo(_conn(args), **demo), args.out)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="memguard-demo-") as tmp:
        server = _demo_server(args, Path(tmp))
        print(f"local server on {server.target} (engine {server.server.engine.name}, "
              f"guarded={server.server.engine.guarded}, testbed {args.testbed}; loopback only, no API keys)")
        try:
            rows = run_demo(Connection(server.target, timeout=args.timeout), **demo)
        finally:
            server.stop()
    return _demo_output(rows, args.out)


def _demo_server(args, tmp: Path):
    """A loopback server on the testbed's model, index and policy, as `memguard serve` runs it, with a
    temporary copy of the index's protected registry (the demo never writes into the shipped tree)."""
    import logging
    import sqlite3

    from memguard.index.manifest import REGISTRY_DB
    from memguard.index.registry import ENV_REGISTRY
    from memguard.server.app import BackgroundServer
    from memguard.server.config import ServerConfig, override
    from memguard.testbed.registry import get_testbed

    tb = get_testbed(args.testbed)
    registry = tmp / REGISTRY_DB
    shipped = tb.index_dir / REGISTRY_DB
    if shipped.is_file():   # sqlite's backup API: a consistent copy, WAL included
        with sqlite3.connect(f"file:{shipped}?mode=ro", uri=True) as src, sqlite3.connect(registry) as dst:
            src.backup(dst)
    os.environ[ENV_REGISTRY] = f"sqlite://{registry}"
    # Two notices that a demo user cannot act on are dropped, here only, by their exact text:
    # - memguard.server.app: "no auth_file: authentication is DISABLED (allowed on loopback ... only)":
    #   the demo's server listens on loopback for this process alone (the header line says so);
    # - memguard.index.sealed: "... PUBLIC demo key: fine for the shipped testbeds' sample photos":
    #   the shipped testbeds' faces are public sample photos, sealed with the public key on purpose.
    logging.getLogger("memguard.server.app").addFilter(
        lambda record: not record.getMessage().startswith("no auth_file: authentication is DISABLED"))
    logging.getLogger("memguard.index.sealed").addFilter(
        lambda record: "PUBLIC demo key: fine for the shipped testbeds" not in record.getMessage())
    index = tb.index_dir if tb.index_dir.is_dir() and not args.tiny_random else None
    # face_match_scope "any": the demo shows a training-set face blurred (FACE_OBFUSCATED); a served
    # deployment keeps the default, "protected", which tells no caller who is in the training set
    config = override(ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, face_match_scope="any"),
                      **{"engine.tiny_random": args.tiny_random or None,
                         "engine.model": None if args.tiny_random else str(tb.model_dir),
                         "engine.index": str(index) if index else None,
                         "engine.policy": None if args.tiny_random else str(tb.policy_path)})
    server = BackgroundServer(config)
    server.start()
    return server


def _demo_output(rows, out: Path | None) -> int:
    from memguard.server.demo import contact_sheet, format_rows, write_images

    print(format_rows(rows))
    if out is not None:
        paths = write_images(rows, out)
        sheet = contact_sheet(rows, out / "contact_sheet.png")
        print(f"{len(paths)} released image(s) written to {out.resolve()} (blocked requests return none); "
              f"contact sheet: {sheet.resolve()}")
    return 1 if any(r.result is None for r in rows) else 0


def _apikey(args) -> int:
    from memguard.server.auth import key_entry, new_key

    key = new_key()
    entry = key_entry(args.name, key, [s.strip() for s in args.scopes.split(",") if s.strip()])
    # the key goes to stderr (the terminal) only: stdout is meant for `>> keys.toml`
    print(f"API key for {args.name} (shown once; the key file keeps only its sha256): {key}", file=sys.stderr)
    print(f'[[keys]]\nname = {json.dumps(entry["name"])}\nsha256 = "{entry["sha256"]}"\n'
          f'scopes = {json.dumps(entry["scopes"])}')
    return 0
