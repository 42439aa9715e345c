"""`-m owner` (xt_owner.c's owner_mt, revision 1) over the facts codegen/c/owner.py's
`owner_of` filled: the socket's state first, then the file's fsuid and fsgid ranges (with
--suppl-groups, the fsgid's or a supplementary group's, `owner_in_groups`)."""

from __future__ import annotations

from codegen.rules.extensions.owner import OWNER_GID, OWNER_SOCKET, OWNER_UID, Owner

from .common import UINT32_MAX, Labels, in_range, negation

MODEL = Owner


def write(match: Owner, labels: Labels) -> list[str]:
    flags, invert = match.flags
    miss = f"goto {labels.miss};"
    code: list[str] = []
    # No socket (or none a struct socket holds): only a match of negated options holds.
    if flags ^ invert != 0:
        code.append(f"if (f->owner_state == OWNER_NONE) {miss}")
    if flags & invert & OWNER_SOCKET:  # ! --socket-exists, and there is one
        return [*code, f"if (f->owner_state != OWNER_NONE) {miss}"]
    # A socket no file holds: the uid and gid options fail unless negated.
    if (flags ^ invert) & (OWNER_UID | OWNER_GID) != 0:
        code.append(f"if (f->owner_state == OWNER_NO_FILE) {miss}")
    for field, ids in (("f->owner_uid", match.uid), ("f->owner_gid", match.gid)):
        if ids is None:
            continue
        inside = in_range(field, ids.first, ids.last, UINT32_MAX)
        if field == "f->owner_gid" and match.supplementary and inside not in ("0", "1"):
            # or one of the supplementary groups (an empty range holds none of them either)
            groups = f"owner_in_groups(f->owner_groups, {ids.first}u, {ids.last}u)"
            inside = f"({inside}) || {groups}"
        outside = inside if ids.negated else negation(inside)
        if outside in ("0", "!(1)"):
            continue  # every id holds
        fails = "1" if outside in ("1", "!(0)") else f"({outside})"
        code.append(
            f"if (f->owner_state == OWNER_FILE{'' if fails == '1' else ' && ' + fails}) {miss}"
        )
    return code
