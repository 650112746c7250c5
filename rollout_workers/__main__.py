"""`opd rollout` / `python -m rollout_workers`: feed prompts and run rollout workers."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from opd.config import ConfigError, load_config
from opd.logs import setup_logging
from opd.prompts import PromptSourceError, load_prompts
from opd.streams import StreamError, connect
from protos.records import PromptRecord
from rollout_workers.config import RolloutConfig
from rollout_workers.engine import BackendError
from rollout_workers.rewards import RewardError, load_reward
from rollout_workers.tools import ToolBox, ToolError

DESCRIPTION = (
    "Sample responses from the student model for prompts read from the Redis stream {ns}:prompts and "
    "push rollout records (token ids, mask, behaviour log-probs, reward, policy version) to "
    "{ns}:rollouts; load newer student weights when the trainer announces them. --prompts FILE feeds a "
    "JSONL/Parquet prompt file to the stream first; --workers N runs N worker processes, --ray "
    "[ADDRESS] runs them as Ray actors. Options come from --config YAML < OPD_ROLLOUT__* env < flags."
)


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """`--ray` with no address (last, or followed by another flag) means `--ray local`."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--ray" and (i + 1 == len(out) or out[i + 1].startswith("--")):
            out.insert(i + 1, "local")
            break
    return out


async def _feed_only(config: RolloutConfig, records: list[PromptRecord]) -> None:
    from rollout_workers.worker import feed_from_config

    redis = connect(config.redis)
    try:
        await feed_from_config(config, redis, records)
    finally:
        await redis.aclose()


async def _single(config: RolloutConfig, records: list[PromptRecord] | None) -> int:
    from rollout_workers.worker import install_signal_handlers, run_worker

    stop = asyncio.Event()
    install_signal_handlers(stop)
    await run_worker(config, stop=stop, feed=records)
    return 0


def _check(config: RolloutConfig) -> list[PromptRecord] | None:
    """Fail fast, before an engine starts, on a bad prompt file, reward or tool spec."""
    load_reward(config.reward.function)
    ToolBox.from_specs(config.tools.enabled, config.tools.timeout_s)
    return load_prompts(config.prompts, config.dataset) if config.prompts else None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(
            RolloutConfig,
            normalize_argv(sys.argv[1:] if argv is None else argv),
            prog="opd rollout",
            description=DESCRIPTION,
            env_prefix="OPD_ROLLOUT__",
        )
        setup_logging(config.log_level)
        records = _check(config)
        if config.feed_only:
            asyncio.run(_feed_only(config, records or []))
            return 0
        if config.ray:
            from rollout_workers.fleet import run_ray_fleet

            return run_ray_fleet(config, records)
        if config.workers > 1:
            from rollout_workers.fleet import run_local_fleet

            return run_local_fleet(config, records)
        return asyncio.run(_single(config, records))
    except (ConfigError, PromptSourceError, RewardError, ToolError, BackendError, StreamError) as exc:
        print(f"opd rollout: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
