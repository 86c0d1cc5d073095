"""One supervised vLLM server per GPU: ``[program:vllm]`` expanded inside supervisord at start.

supervisord.conf cannot loop. supervisor offers three ways to run N copies of a program; we use the third:

1. ``numprocs = N`` with ``%(process_num)d``: N must be written in the file (``%(ENV_X)s`` can only copy a
   variable, it cannot count ``OLMOCR_GPUS=0,1,3`` or ask ``nvidia-smi`` for ``all``), each copy would
   have to work out its GPUs from its number, and the single-GPU process would lose its name ``vllm``.
2. an ``[include]`` of a file generated before start: a second step every launcher (systemd, Slurm,
   Kubernetes, a shell) must remember, and a stale file when ``OLMOCR_GPUS`` changes.
3. the olmocr RPC extension, which supervisord loads before it starts any program
   (``Supervisor.run``: process groups are built, then ``openhttpservers`` calls the rpcinterface
   factories, then ``runforever`` starts them). It resolves ``OLMOCR_GPUS`` once, in supervisord's own
   environment, and replaces the ``vllm`` group by one made of copies of supervisord's own
   ``ProcessConfig`` for the program, so every copy keeps every option of the file (restart policy,
   stop signals, log rotation) and supervisord's usual machinery (restart, logs, XML-RPC,
   ``supervisorctl status`` showing ``vllm:vllm-0`` ...) applies unchanged. It also wraps
   ``options.process_config`` so that ``supervisorctl reread``/``update`` expand the re-read file
   the same way and find nothing changed.

So ``OLMOCR_GPUS=0,1,2 supervisord -c supervisord.conf`` is the whole recipe. Per server i the copy gets
``OLMOCR_PORT`` = port + i, ``CUDA_VISIBLE_DEVICES`` = its GPUs, its own log (``vllm-<i>.log``) and TMPDIR
(``vllm-tmp-<i>``); the RPC extension keeps its restart count and health record under its process name.
With one server nothing is renamed (the program stays ``vllm``); only ``CUDA_VISIBLE_DEVICES`` is set
when GPUs were chosen.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from typing import Any

from olmocr import envs
from olmocr.server.gpus import ServerSlot

ENV_SERVER_INDEX = "OLMOCR_SERVER_INDEX"


def _per_server_path(path: Any, slot: ServerSlot) -> Any:
    """``.../vllm.log`` -> ``.../vllm-<i>.log`` (not for the Automatic/None sentinels)."""
    if not isinstance(path, str) or slot.name == slot.group:
        return path
    root, ext = os.path.splitext(path)
    stem = os.path.basename(root)
    if stem == slot.group:
        return os.path.join(os.path.dirname(root), slot.name + ext)
    return f"{root}-{slot.index}{ext}"


def server_environment(template: dict[str, str] | None, slot: ServerSlot) -> dict[str, str]:
    env = dict(template or {})
    env["OLMOCR_PORT"] = str(slot.port)
    env[ENV_SERVER_INDEX] = str(slot.index)
    if slot.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.cuda_visible_devices
    tmpdir = envs.text("OLMOCR_VLLM_TMPDIR", env)
    if tmpdir and slot.name != slot.group:
        env["OLMOCR_VLLM_TMPDIR"] = f"{tmpdir}-{slot.index}"
    return env


def server_process_configs(template: Any, slots: Sequence[ServerSlot]) -> list[Any]:
    """Copies of supervisord's ``ProcessConfig`` for the program, one per server."""
    out = []
    for slot in slots:
        config = copy.copy(template)
        config.name = slot.name
        config.environment = server_environment(template.environment, slot)
        config.stdout_logfile = _per_server_path(template.stdout_logfile, slot)
        config.stderr_logfile = _per_server_path(template.stderr_logfile, slot)
        out.append(config)
    return out


def expand_group_configs(group_configs: Sequence[Any], slots: Sequence[ServerSlot]) -> list[Any]:
    """supervisord's process group configs with the ``vllm`` group made of one process per server.

    Idempotent: a group already expanded (its processes already named as ``slots``) is kept as it is.
    """
    group_name = slots[0].group
    out = []
    for group in group_configs:
        if group.name != group_name or not hasattr(group, "process_configs"):
            out.append(group)
            continue
        names = [c.name for c in group.process_configs]
        if names == [s.name for s in slots] and all(
                c.environment and envs.text(ENV_SERVER_INDEX, c.environment) == str(s.index)
                for c, s in zip(group.process_configs, slots, strict=True)):
            out.append(group)
            continue
        if len(group.process_configs) != 1:
            raise ValueError(f"[program:{group_name}] must not set numprocs: OLMOCR_GPUS decides how many "
                             "servers run")
        new_group = copy.copy(group)
        new_group.process_configs = server_process_configs(group.process_configs[0], slots)
        out.append(new_group)
    return out


def expand_in_supervisord(supervisord: Any, slots: Sequence[ServerSlot]) -> bool:
    """Apply the expansion to a running (not yet started) supervisord; True if the group changed.

    Called from the RPC extension's factory, before ``runforever`` starts any process.
    """
    options = supervisord.options
    new_configs = expand_group_configs(options.process_group_configs, slots)
    changed = False
    for old, new in zip(options.process_group_configs, new_configs, strict=True):
        if old is new:
            continue
        group = supervisord.process_groups.get(new.name)
        if group is not None and group.config is not new:
            if not supervisord.remove_process_group(new.name):
                continue  # already running (a factory called again after start): leave it
            supervisord.add_process_group(new)
        changed = True
    options.process_group_configs = new_configs
    _wrap_process_config(options, slots)
    return changed


def _wrap_process_config(options: Any, slots: Sequence[ServerSlot]) -> None:
    """``supervisorctl reread``/``update`` re-read the file: expand the result the same way."""
    original: Callable[..., Any] = getattr(options, "_olmocr_unexpanded_process_config", None) or \
        options.process_config

    def process_config(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        options.process_group_configs = expand_group_configs(options.process_group_configs, slots)
        return result

    options._olmocr_unexpanded_process_config = original
    options.process_config = process_config
