"""`lorafleet demo` (`make demo`): the whole flow on one machine, with nothing but this repository.

Builds the tiny model, its two adapters and a tiny CLIP into ./demo (once), starts a private redis-server
(unless LORAFLEET_REDIS_URL is set) and one CPU worker, submits examples/prompts.jsonl with
--wait (the package's copy: `lorafleet demo` runs outside a checkout), prints where the videos are, then stops what it started. With a sweep spec
(`lorafleet demo --sweep examples/sweep.yaml`, what `make sweep` runs when no fleet is configured),
the same fleet runs that sweep instead, evaluated without CLIP (unless LORAFLEET_EVAL_CLIP is set),
compared with the last one;
a model alias the spec names and LORAFLEET_MODELS does not define is served from the tiny model
by a worker of its own (the draft of a spec with `confirm:` as a TaylorSeer draft tier).
With `--kind i2v` (or another kind of `lorafleet tiny-model`), the fleet serves that tiny model
(built into ./demo/<kind>, input images in ./demo/<kind>/images) and submits examples/<kind>.jsonl.
"""

import json
import os
import subprocess
import sys
from contextlib import ExitStack
from importlib import resources

from rich.console import Console

from lorafleet.redis_server import RedisServer
from workers.supervisor import spawn_worker, stop_worker, wait_until_ready

DEMO_DIR = "demo"
# The demo's jobs ship with the package: `lorafleet demo` runs from a pip-installed wheel too.
EXAMPLES = str(resources.files("lorafleet") / "examples")


def run_demo(console: Console, sweep: str | None = None, kind: str = "t2v") -> int:
    """Run the demo (or the sweep `sweep` on the demo's fleet) on the tiny model of a kind; returns
    the exit code of the submit."""
    folder = DEMO_DIR if kind == "t2v" else os.path.join(DEMO_DIR, kind)
    model_dir = os.path.join(folder, "model")
    built = (os.path.join(model_dir, "model_index.json"), os.path.join(folder, "clip", "config.json"))
    if not all(os.path.exists(path) for path in built):
        console.print(f"building the tiny {kind} model into {folder}/ ...")
        from workers.worker import keep_torchao_out

        keep_torchao_out()  # the demo never uses fp8: no torchao warnings as its first words
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # nor a progress bar per tiny file
        import transformers

        transformers.logging.set_verbosity_error()  # its notes on optional packages the demo does not use
        from workers.tiny_model import write_tiny_model

        write_tiny_model(folder, kind=kind)
    # No LORAFLEET_EVAL_CLIP unless the user sets one: the tiny CLIP's weights are random, its
    # numbers would measure nothing, and the sweep's rule would follow them (rules.rule_text).
    env = {**os.environ, "LORAFLEET_MODEL": os.path.abspath(model_dir)}
    env.setdefault("LORAFLEET_STORE_URL", "./results")
    with ExitStack() as stack:
        if "LORAFLEET_REDIS_URL" not in os.environ:
            redis = stack.enter_context(RedisServer())
            env["LORAFLEET_REDIS_URL"] = redis.url
            console.print(f"started a private redis-server at {redis.url}")
        aliases = sweep_aliases(sweep, env, os.path.abspath(model_dir)) if sweep else {}
        if aliases:
            env["LORAFLEET_MODELS"] = json.dumps({**json.loads(env.get("LORAFLEET_MODELS") or "{}"), **aliases})
        # Each worker its own log: the README's own-fleet worker writes demo/worker.log, maybe at the same time.
        log_path = os.path.join(DEMO_DIR, "demo-worker.log")
        started = [(["--device", "cpu"], log_path)] + [
            (["--device", "cpu", "--model", alias], os.path.join(DEMO_DIR, f"demo-worker-{alias}.log"))
            for alias in aliases
        ]
        for flags, log in started:
            serves = f"model {flags[-1]}" if "--model" in flags else "the default model"
            console.print(f"starting a CPU worker for {serves} (log: {log}) ...")
            worker = spawn_worker(flags, env, log)
            stack.callback(stop_worker, worker)
            wait_until_ready(worker, log)
        examples = os.path.join(EXAMPLES, "prompts.jsonl" if kind == "t2v" else f"{kind}.jsonl")
        command = ["sweep", sweep, "--compare", "latest"] if sweep else ["submit", examples, "--wait"]
        code = subprocess.call([sys.executable, "-m", "lorafleet", *command], env=env)
    store = env["LORAFLEET_STORE_URL"]
    if sweep:
        return code
    if code == 0:
        console.print(f"[green]demo done:[/] videos in {store}/videos/, manifests in {store}/batches/")
    else:
        console.print(f"[red]demo: some jobs failed[/] (exit {code}); see {log_path}")
    return code


def sweep_aliases(spec_path: str, env: dict, model_dir: str) -> dict[str, dict]:
    """The model aliases a sweep spec names that the environment does not define, as the demo
    serves them from its tiny model: the sweep's own model a draft tier (TaylorSeer) when the spec
    confirms on another, else exact. Each gets a worker of its own, as a fleet's would."""
    from common.sweep_spec import read_spec

    spec = read_spec(spec_path)
    defined = json.loads(env.get("LORAFLEET_MODELS") or "{}")
    confirm = spec.get("confirm") if isinstance(spec.get("confirm"), dict) else None
    wanted = {spec.get("model"): confirm is not None, (confirm or {}).get("model"): False}
    return {
        alias: {"ref": model_dir, "cache": {"hook": "taylorseer"}} if draft else {"ref": model_dir}
        for alias, draft in wanted.items()
        if isinstance(alias, str) and alias not in defined
    }
