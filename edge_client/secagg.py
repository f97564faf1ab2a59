"""The ClientApp's side of SecAgg+: Flower's ``secaggplus_mod``, switched on per run.

A run with ``secagg = true`` trains through Flower's legacy SecAgg+ workflow
(:mod:`fedscale.server.secagg`), whose messages are the legacy ``fit`` records:
``fitins.parameters`` (the global model as an unnamed list of arrays) and
``fitins.config``, answered with ``fitres.*``. Flower's ``secaggplus_mod`` runs
the protocol's four stages and, in the one that trains, masks the reply's
``fitres.parameters`` before it leaves the node.

:func:`secagg_mod` hands such a run's train messages to ``secaggplus_mod`` and,
for the stage that trains, translates between the legacy records and the ones
fedscale's train handler reads and writes (``arrays`` named as the model's state
dict, ``config``; ``arrays`` and ``metrics`` back). The names come from the
server in the round's config (``array-names``), so the handler loads and checks
the model exactly as in any other run. Mods listed after this one (client-side
local DP) see fedscale's records, so they act on the plain update before it is
masked. Any other run's messages pass straight through.
"""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedscale.exceptions import RecordError

if TYPE_CHECKING:
    from flwr.clientapp.typing import ClientAppCallable

__all__ = ["ARRAY_NAMES_KEY", "secagg_mod"]

# fitins.config key: the global model's array names, in order, as a JSON list (the
# legacy records carry the arrays unnamed).
ARRAY_NAMES_KEY = "array-names"
_FITINS_ARRAYS = "fitins.parameters"
_FITINS_CONFIG = "fitins.config"


def secagg_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Run a secagg run's train message through Flower's SecAgg+ mod; pass others on."""
    if ctxt.run_config.get("secagg", False) is not True:
        return call_next(msg, ctxt)
    from flwr.client.mod import secaggplus_mod

    def train_in_fedscale_records(legacy: Message, context: Context) -> Message:
        translated = to_fedscale_message(legacy)
        reply = call_next(translated, context)
        names = list(translated.content.array_records["arrays"])
        return Message(to_legacy_reply(reply.content, names), reply_to=legacy)

    return secaggplus_mod(msg, ctxt, train_in_fedscale_records)


def to_fedscale_message(legacy: Message) -> Message:
    """Return the legacy ``fitins`` train message as fedscale's train handler reads it."""
    content = legacy.content
    if _FITINS_ARRAYS not in content.array_records or _FITINS_CONFIG not in content.config_records:
        raise RecordError(
            f"secagg train message: expected records {_FITINS_ARRAYS!r} and "
            f"{_FITINS_CONFIG!r} (Flower's legacy fit instructions), got {sorted(content)}"
        )
    config = ConfigRecord(dict(content.config_records[_FITINS_CONFIG]))
    names = _array_names(config.pop(ARRAY_NAMES_KEY, None))
    legacy_arrays = content.array_records[_FITINS_ARRAYS]
    if len(legacy_arrays) != len(names):
        raise RecordError(
            f"secagg train message: expected {len(names)} arrays (one per name in "
            f"{ARRAY_NAMES_KEY!r}), got {len(legacy_arrays)}"
        )
    from flwr.common import bytes_to_ndarray  # np.load with allow_pickle=False

    # The legacy records keep the list's order in keys "0", "1", ...
    arrays = ArrayRecord(
        {name: Array(bytes_to_ndarray(legacy_arrays[str(i)].data)) for i, name in enumerate(names)}
    )
    translated: Message = Message(  # type: ignore[call-overload]
        metadata=copy.copy(legacy.metadata),
        content=RecordDict({"arrays": arrays, "config": config}),
    )
    return translated


def to_legacy_reply(content: RecordDict, names: list[str]) -> RecordDict:
    """Return fedscale's train reply (``arrays``, ``metrics``) as Flower's legacy ``fitres``.

    The arrays are listed in the order of ``names`` (the global model's, as received).
    """
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    arrays = content.array_records.get("arrays")
    metrics = content.metric_records.get("metrics")
    if arrays is None or metrics is None or "num-examples" not in metrics:
        raise RecordError(
            "secagg train reply: expected records 'arrays' and 'metrics' with "
            f"'num-examples' (fedscale's train handler), got {sorted(content)}"
        )
    if sorted(arrays) != sorted(names):
        raise RecordError(f"secagg train reply: expected arrays {names}, got {list(arrays)}")
    num_examples = metrics["num-examples"]
    if isinstance(num_examples, bool) or not isinstance(num_examples, int):
        raise RecordError(
            f"secagg train reply: expected an integer 'num-examples', got {num_examples!r}"
        )
    fitres = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters([arrays[name].numpy() for name in names]),
        num_examples=num_examples,
        metrics={k: v for k, v in metrics.items() if k != "num-examples"},  # type: ignore[misc]
    )
    return compat.fitres_to_recorddict(fitres, keep_input=False)


def _array_names(value: object) -> list[str]:
    try:
        names = json.loads(value) if isinstance(value, str) else None
    except json.JSONDecodeError:
        names = None
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        raise RecordError(
            f"secagg train message: expected config {ARRAY_NAMES_KEY!r} as a JSON list of "
            f"the model's distinct array names, got {value!r}"
        )
    return names
