"""Reading a YAML mapping (a run config, a server config) so that every way the file can be wrong is a
`ConfigError` naming file:line and the fix: not UTF-8, not YAML, nested too deeply, a key written twice (PyYAML
would keep the last one silently), or not a mapping at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from loraforge.errors import ConfigError, Problem


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """safe_load, but a mapping that names a key twice is an error. Keys brought in by a merge (`<<: *base`) may
    be overridden: that is what merging is for."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=False)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it itself below
                continue
            if first is not None:
                raise _DuplicateKey(None, None, f"key `{key}` appears twice (first on line {first.start_mark.line + 1})",
                                    key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def load_yaml_mapping(path: Path, *, what: str = "the config") -> dict[str, Any]:
    """The mapping in YAML file `path` ({} for an empty file).

    Raises:
        ConfigError: unreadable, not UTF-8, not valid YAML, a duplicate key, or not a mapping (file:line named).
    """
    try:
        raw = yaml.load(path.read_bytes().decode("utf-8"), Loader=_StrictLoader)  # noqa: S506 — a SafeLoader
    except OSError as e:
        raise ConfigError([Problem(str(path), f"cannot read {what}: {e.strerror or e}", fix="check the path and its "
                                   "permissions")]) from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ConfigError([Problem(f"{path}:{line}", f"not UTF-8 text ({e.reason} at byte {e.start})",
                                   allowed="a UTF-8 encoded YAML file",
                                   fix="save the file as UTF-8 (e.g. `iconv -f GBK -t UTF-8 in.yaml > out.yaml`)")]) from None
    except _DuplicateKey as e:
        raise ConfigError([Problem(f"{path}:{e.problem_mark.line + 1}", e.problem,
                                   fix="keep one of the two lines (YAML would silently use the last)")]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([Problem(where, f"not valid YAML: {getattr(e, 'problem', None) or e}",
                                   allowed="one `key: value` per line; lists as [a, b]; quotes around text with `:`",
                                   fix="check the brackets, quotes and indentation on that line and the one before")]) from None
    except RecursionError:
        raise ConfigError([Problem(str(path), "nested too deeply to read", allowed="key: value lines",
                                   fix="a config holds scalars and short lists; remove the deep nesting")]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([Problem(str(path), f"{what} must be a mapping of key: value", value=type(raw).__name__,
                                   allowed="key: value lines at the top level",
                                   fix="remove the leading `- `" if isinstance(raw, list) else "write key: value lines")])
    return raw
