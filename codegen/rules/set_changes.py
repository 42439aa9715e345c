"""What `ipset add|del` does to a set and how `ipset save` prints sets: the changes `bpflab
set add|del` makes in place (harness.deploy.sets) and the text an applied rule set keeps its
sets' members in and `bpflab set save|list` prints (read back by
codegen.rules.sets.parse_sets as they are)."""

from __future__ import annotations

import socket
from dataclasses import replace

from codegen.rules.names import PROTOCOL_NAMES
from codegen.rules.sets import (
    BITMAP_PORT,
    HASH_NET_IFACE,
    ICMP_NAMES,
    LIST_SET,
    WITH_PORT,
    IpSet,
    LineReader,
    Member,
    SetTable,
    added_members,
    full_message,
    member_identity,
    split_words,
)


def changed(
    table: IpSet, entry: str, *, delete: bool = False, exist: bool = False, where: str = "<entry>"
) -> tuple[IpSet, list[Member], list[Member]]:
    """`table` after `ipset add|del NAME ENTRY` (ENTRY: the member as `ipset add` takes it,
    with `nomatch` after it where the type has it), with the members that went in and those
    that went out. As ipset refuses them (one sentence, SetError): adding a member already
    there or deleting one that is not, unless `exist` (ipset -exist: an added member then
    replaces it, nomatch flag and all); adding past the set's maxelem. Unlike ipset, which
    stops in the middle of a range, a refused change changes nothing."""
    reader = LineReader(where, 1, entry)
    words = split_words(entry.strip(), reader)
    if not words:
        raise reader.error("the entry is empty")
    if table.kind == LIST_SET:
        raise reader.error(
            f"set '{table.name}' is a list:set: which sets it holds is compiled into the"
            " programs (apply again to change it; its member sets change in place)"
        )
    if delete and len(words) > 1:
        raise reader.error(f"'{words[1]}' after a member to delete is not supported", words[1])
    members = {member_identity(m): m for m in table.members}
    went_in: list[Member] = []
    went_out: list[Member] = []
    for member in added_members(table, words, reader):
        key = member_identity(member)
        held = members.get(key)
        if delete:
            if held is None:
                if exist:
                    continue
                raise reader.error(f"{shown(table, member)} is not in set '{table.name}'")
            went_out.append(members.pop(key))
        elif held is not None and not exist:
            raise reader.error(
                f"{shown(table, member)} is already in set '{table.name}' (--exist replaces it)"
            )
        elif held != member:
            if held is not None:
                went_out.append(held)
            members[key] = member
            went_in.append(member)
    if len(members) > table.capacity:
        raise reader.error(full_message(table))
    return replace(table, members=tuple(members.values())), went_in, went_out


def shown(table: IpSet, member: Member, *, flag: bool = False) -> str:
    """`member` as `ipset save` prints it (`flag`: with its nomatch flag)."""
    if table.kind == BITMAP_PORT:
        return str(member.port)
    if table.kind == LIST_SET:
        return member.member_set
    text = socket.inet_ntop(socket.AF_INET, member.network.to_bytes(4, "big"))
    if member.prefix != 32:
        text += f"/{member.prefix}"
    if table.kind in WITH_PORT:
        if member.protocol == 1:
            code = (member.port >> 8, member.port & 0xFF)
            named = [name for name, value in ICMP_NAMES.items() if value == code]
            port = named[0] if named else f"{code[0]}/{code[1]}"
        else:
            port = str(member.port)
        text += f",{PROTOCOL_NAMES.get(member.protocol, str(member.protocol))}:{port}"
    if table.kind == HASH_NET_IFACE:
        text += f",{member.iface}{' wildcard' if member.wildcard else ''}"
    return f"{text} nomatch" if flag and member.nomatch else text


def header(table: IpSet) -> str:
    """The options of `table` as `ipset save` and `ipset list` print them."""
    if table.kind == BITMAP_PORT:
        return f"range {table.port_range[0]}-{table.port_range[1]}"
    if table.kind == LIST_SET:
        return f"size {table.size}"
    return f"family inet maxelem {table.maxelem}"


def save_text(sets: SetTable) -> str:
    """`sets` as `ipset save` prints them (read back by parse_sets as they are)."""
    lines = []
    for table in sets.sets.values():
        lines.append(f"create {table.name} {table.kind} {header(table)}")
        lines += [f"add {table.name} {shown(table, member, flag=True)}" for member in table.members]
    return "".join(line + "\n" for line in lines)
