"""PEFT's module-name patterns, matched in time linear in the names and the keys.

PEFT gives a module the value of the first ``rank_pattern``/``alpha_pattern`` key, in the
file's order, for which ``re.match(rf"(.*\\.)?({key})$", module)`` succeeds. Done that way,
every key is tried on every module (200k keys × 100k modules), and a key such as ``(.*)*!``
backtracks for ever. ``PatternKeys`` keeps that rule and bounds the work:

- A key without regular-expression syntax is a module name or a dotted suffix of one; so is
  a key that parses to plain characters (``model\\.layers\\.0\\.q_proj``, or ``^…``-anchored
  as ``re.escape`` writes them). These are looked up in dicts, whatever their number. A bare
  ``.`` in such a key is a dot (PEFT's regex lets it match any character).
- Any other key is a regular expression. One that nests repeats (``(.*)*``, ``(a+)+``) or
  repeats an alternation (``(a|a)*``), on which PEFT's backtracking can take exponential
  time, is refused (exit 3), as is one using what a finite automaton cannot follow
  (backreferences, lookarounds, word boundaries, atomic groups). The others are compiled
  together into one automaton, built lazily, that reads each module name once.
- Every lookup and automaton step counts against ``MAX_STEPS``; past it the keys are refused
  (exit 3) rather than left to spin.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

from adapterctl.errors import UnsupportedAdapter

# The standard library's regex parser (``re._parser`` since 3.11, ``sre_parse`` before).
_NEW_RE = sys.version_info >= (3, 11)
_parser: Any = importlib.import_module("re._parser" if _NEW_RE else "sre_parse")
_compiler: Any = importlib.import_module("re._compiler" if _NEW_RE else "sre_compile")
_c: Any = importlib.import_module("re._constants" if _NEW_RE else "sre_constants")

# Counted operations (dict lookups, automaton steps and node visits) one set of keys may spend
# on all the module names it is matched against: some seconds of work at most, and over ten
# times what 100k modules with a few regular-expression keys need.
MAX_STEPS = 100_000_000

# Characters that make a key a regular expression (a dot alone does not).
_REGEX_SYNTAX = re.compile(r"[\\^$*+?{}\[\]()|]")
# A key that is plain characters once its escapes are read, ``^``-anchored or not, with an
# optional closing ``$`` (as ``re.escape`` and adapterctl write module names): found without
# running the regex parser, which costs about 40 µs a key.
_ESCAPED = re.compile(r"(\^?)((?:[^\\^$*+?{}\[\]()|.]|\\[^A-Za-z0-9])*)\$?", re.DOTALL)
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)

_CHAR_OPS = (_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN)
_REPEATS = (_c.MAX_REPEAT, _c.MIN_REPEAT)
_POSSESSIVE = getattr(_c, "POSSESSIVE_REPEAT", None)
_ATOMIC = getattr(_c, "ATOMIC_GROUP", None)
_BEGIN = (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING)
_END = (_c.AT_END, _c.AT_END_STRING)

# Automaton node kinds.
_CHAR, _SPLIT, _AT_BEGIN, _AT_END, _ACCEPT = range(5)


class _Refused(Exception):
    """A key this module will not match (the reason is the message)."""


class PatternKeys:
    """The keys of one pattern dict, ready to be matched against many module names.

    Args:
        keys: the keys, in the file's order (a dict works).
        field: the config field they come from, for messages (``rank_pattern``).

    Raises:
        UnsupportedAdapter: a key nests repeats or uses unsupported syntax (naming the key),
            or matching would take more than ``MAX_STEPS`` operations.

    Example:
        >>> keys = PatternKeys({"q_proj": 4, r"layers\\.1\\..*": 8})
        >>> keys.first("model.layers.1.self_attn.q_proj")
        'q_proj'
    """

    def __init__(self, keys: Iterable[str], field: str = "pattern") -> None:
        self.keys = list(keys)
        self.field = field
        self.steps = 0  # counted operations so far (see MAX_STEPS)
        self._suffix = SuffixIndex()  # names and dotted suffixes -> key positions
        self._exact: dict[str, list[int]] = {}  # a whole module name -> key positions
        self._nfa = _Nfa()
        roots: list[int] = []  # automaton starts tried at the start of a name only
        bodies: list[int] = []  # starts tried there and after every dot (PEFT's prefix)
        for pos, key in enumerate(self.keys):
            self._add(pos, key, roots, bodies)
        self._dfa = _Dfa(self._nfa, roots, bodies, self._spend) if roots or bodies else None

    def first(self, module: str) -> str | None:
        """The first key (in order) that matches ``module``, as PEFT picks it; None if none."""
        hits = self._positions(module)
        return self.keys[hits[0]] if hits else None

    def all(self, module: str) -> list[str]:
        """Every key that matches ``module``, in order."""
        return [self.keys[i] for i in self._positions(module)]

    def _positions(self, module: str) -> list[int]:
        hits = self._match(module)
        # PEFT's closing ``$`` also matches before a final newline (``\Z`` does not).
        if module.endswith("\n"):
            hits |= self._match(module[:-1], trimmed=True)
        return sorted(hits)

    def _match(self, name: str, trimmed: bool = False) -> set[int]:
        hits: set[int] = set(self._exact.get(name, ()))
        self._spend(1)
        # PEFT's prefix (.*\.) cannot run over a newline.
        hits.update(self._suffix.find(name, self._spend, newline_in_prefix=False))
        if self._dfa is not None:
            hits.update(self._dfa.match(name, trimmed))
        return hits

    def _spend(self, n: int) -> None:
        self.steps += n
        if self.steps > MAX_STEPS:
            longest = max(self.keys, key=len)
            raise UnsupportedAdapter(
                f"{self.field}: matching its {len(self.keys)} key(s) against the module names "
                f"takes more than {MAX_STEPS:,} steps (longest key {_short(longest)}); write "
                "the keys as plain module names, or fewer of them"
            )

    def _add_literal(self, pos: int, anchored: bool, text: str) -> None:
        if anchored:
            self._exact.setdefault(text, []).append(pos)
        else:
            self._suffix.add(text, pos)

    def _add(self, pos: int, key: str, roots: list[int], bodies: list[int]) -> None:
        """File ``key`` under the dicts or the automaton."""
        if not _REGEX_SYNTAX.search(key):
            self._suffix.add(key, pos)
            return
        escaped = _ESCAPED.fullmatch(key)
        if escaped is not None:
            text = _ESCAPE.sub(r"\1", escaped[2])
            self._add_literal(pos, bool(escaped[1]), text)
            return
        try:
            parsed = _parser.parse(rf"(.*\.)?({key})$")
        except (re.error, OverflowError, RecursionError):
            # PEFT's re.match raises here; adapterctl has always read such a key as a name.
            self._suffix.add(key, pos)
            return
        body = _peft_body(parsed)
        items = body if body is not None else list(parsed)
        try:
            _check_backtracking(items)
            flags = parsed.state.flags
            literal = _literal(items, flags) if body is not None else None
            if literal is not None:
                self._add_literal(pos, *literal)
                return
            accept = self._nfa.add(_ACCEPT, pos)
            if body is None:
                # An unbalanced key that re-shapes PEFT's whole pattern: match it as written;
                # re.match needs only a prefix of the name, hence the trailing any-character
                # loop.
                loop = self._nfa.add(_SPLIT, [])
                self._nfa.alts[loop] = [self._nfa.add(_CHAR, _ANYTHING, loop), accept]
                roots.append(self._nfa.build(items, flags, parsed.state, loop))
            else:
                bodies.append(self._nfa.build(items, flags, parsed.state, accept))
        except RecursionError:
            raise UnsupportedAdapter(
                f"{self.field} key {_short(key)} nests groups too deeply to match; rewrite the key"
            ) from None
        except _Refused as why:
            raise UnsupportedAdapter(
                f"{self.field} key {_short(key)} {why}; rewrite the key (a module's name, or a "
                "simpler regular expression)"
            ) from None


class SuffixIndex:
    """Names looked up by the module names that end with them: ``module`` finds ``name`` when
    it is ``name`` or ends with ``"." + name`` (PEFT's rule for ``target_modules``,
    ``modules_to_save`` and plain pattern keys), whatever the number of names.

    A lookup tries only the suffixes that start after a dot and have the length of some
    name: at most min(dots in the module name + 1, distinct name lengths) dict lookups.
    """

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._values: dict[str, list[int]] = {}
        self._lengths: set[int] = set()
        self._sorted: list[int] | None = None
        for i, name in enumerate(names):
            self.add(name, i)

    def __len__(self) -> int:
        return len(self._values)

    def add(self, name: str, value: int) -> None:
        """Index ``name`` with ``value`` (several values may share a name)."""
        self._values.setdefault(name, []).append(value)
        if len(name) not in self._lengths:
            self._lengths.add(len(name))
            self._sorted = None

    def find(
        self, module: str, spend: Callable[[int], None] | None = None, *,
        newline_in_prefix: bool = True,
    ) -> list[int]:  # fmt: skip
        """The values of every name ``module`` is or ends with after a dot.

        Args:
            module: a full module name.
            spend: called with the operations each lookup costs (for a work bound).
            newline_in_prefix: False for PEFT's pattern keys, whose ``(.*\\.)`` prefix stops
                at a newline.
        """
        if not self._values:
            return []
        n = len(module)
        stop = module.find("\n") if not newline_in_prefix else -1
        out: list[int] = []
        if len(self._lengths) <= module.count(".") + 1:
            if self._sorted is None:
                self._sorted = sorted(self._lengths)
            starts: Iterable[int] = (n - length for length in self._sorted if length <= n)
        else:
            starts = [0]
            dot = module.find(".")
            while dot >= 0:
                starts.append(dot + 1)
                dot = module.find(".", dot + 1)
        for start in starts:
            if spend is not None:
                spend(1 + (n - start) // 64)
            if start and (module[start - 1] != "." or 0 <= stop < start):
                continue
            if n - start in self._lengths:
                out.extend(self._values.get(module[start:], ()))
        return out

    def __contains__(self, module: object) -> bool:
        return isinstance(module, str) and bool(self.find(module))


def _short(key: str) -> str:
    """``key`` for a message: repr'd (control characters escaped), long ones cut."""
    return repr(key if len(key) <= 80 else key[:77] + "...")


def _peft_body(parsed: Any) -> list[Any] | None:
    """The key's items inside PEFT's ``(.*\\.)?(key)$``, or None when the key's own
    parentheses re-shaped that pattern."""
    items = list(parsed)
    ok = (
        len(items) == 3
        and items[0][0] in _REPEATS
        and items[1][0] is _c.SUBPATTERN
        and items[1][1][0] == 2
        and items[2] == (_c.AT, _c.AT_END)
    )
    return list(items[1][1][3]) if ok else None


def _check_backtracking(items: Any, inside: str | None = None) -> None:
    """Refuse what makes a backtracking matcher exponential: a repeat inside a repeat, or an
    alternation inside a repeat (``inside`` names the enclosing repeat, if any)."""
    for op, av in items:
        if op in _REPEATS or op is _POSSESSIVE:
            _lo, hi, body = av
            if hi > 1 and inside is not None:
                raise _Refused(
                    "nests a repeat inside a repeat, on which PEFT's regex matching can take "
                    "exponential time (a hang)"
                )
            _check_backtracking(body, "repeat" if hi > 1 else inside)
        elif op is _c.BRANCH:
            if inside is not None:
                raise _Refused(
                    "repeats an alternation, on which PEFT's regex matching can take "
                    "exponential time (a hang)"
                )
            for alt in av[1]:
                _check_backtracking(alt, inside)
        elif op is _c.SUBPATTERN:
            _check_backtracking(av[-1], inside)
        elif op is _ATOMIC:
            _check_backtracking(av, inside)


def _literal(items: list[Any], flags: int) -> tuple[bool, str] | None:
    """(anchored, text) when ``items`` match one fixed string (``^`` anchored or not, with an
    optional closing ``$``); None otherwise."""
    if flags & re.IGNORECASE:
        return None
    flat: list[Any] = []
    stack = list(reversed(items))
    while stack:
        op, av = stack.pop()
        if op is _c.SUBPATTERN and not av[1] and not av[2]:  # a plain group
            stack.extend(reversed(list(av[3])))
        else:
            flat.append((op, av))
    anchored = bool(flat) and flat[0][0] is _c.AT and flat[0][1] in _BEGIN
    if anchored:
        flat = flat[1:]
    if flat and flat[-1] == (_c.AT, _c.AT_END):  # ``\Z`` goes to the automaton
        flat = flat[:-1]
    if not all(op is _c.LITERAL for op, _ in flat):
        return None
    return anchored, "".join(chr(av) for _, av in flat)


_ANYTHING = -1  # the matcher index of "any character at all"
_MAX_NODES = 1_000_000


class _Nfa:
    """A Thompson automaton: node kinds, successors and payloads in parallel lists."""

    def __init__(self) -> None:
        self.kind: list[int] = []
        self.arg: list[int] = []  # CHAR: matcher index; ACCEPT: key position; AT_END: 1 for \Z
        self.next: list[int] = []  # CHAR, AT_BEGIN, AT_END: the successor
        self.alts: dict[int, list[int]] = {}  # SPLIT: the successors
        self.matchers: list[Any] = []  # compiled one-character patterns
        self._matcher_ids: dict[tuple[Any, int], int] = {}

    def add(self, kind: int, arg: Any = 0, nxt: int = -1) -> int:
        if len(self.kind) >= _MAX_NODES:
            raise _Refused(f"makes the automaton larger than {_MAX_NODES:,} states")
        self.kind.append(kind)
        self.arg.append(arg if kind in (_CHAR, _ACCEPT, _AT_END) else 0)
        self.next.append(nxt)
        if kind == _SPLIT:
            self.alts[len(self.kind) - 1] = list(arg)
        return len(self.kind) - 1

    def build(self, items: Any, flags: int, state: Any, cont: int) -> int:
        """The start node of ``items`` followed by ``cont`` (built back to front)."""
        for item in reversed(list(items)):
            cont = self._item(item, flags, state, cont)
        return cont

    def _item(self, item: Any, flags: int, state: Any, cont: int) -> int:
        op, av = item
        if op in _CHAR_OPS:
            return self.add(_CHAR, self._matcher(item, flags, state), cont)
        if op is _c.SUBPATTERN:
            _group, add, remove, body = av
            return self.build(body, _combine_flags(flags, add, remove), state, cont)
        if op is _c.BRANCH:
            return self.add(_SPLIT, [self.build(alt, flags, state, cont) for alt in av[1]])
        if op in _REPEATS:
            lo, hi, body = av
            if hi is _c.MAXREPEAT:
                loop = self.add(_SPLIT, [])
                self.alts[loop] = [self.build(body, flags, state, loop), cont]
                start = loop
            else:
                start = cont
                for _ in range(hi - lo):  # (body (body …)?)?
                    start = self.add(_SPLIT, [self.build(body, flags, state, start), cont])
            for _ in range(lo):
                start = self.build(body, flags, state, start)
            return start
        if op is _c.AT:
            if av in _BEGIN and not (av is _c.AT_BEGINNING and flags & re.MULTILINE):
                return self.add(_AT_BEGIN, 0, cont)
            if av in _END and not (av is _c.AT_END and flags & re.MULTILINE):
                return self.add(_AT_END, int(av is _c.AT_END_STRING), cont)
            raise _Refused("uses a word boundary or a multi-line anchor, which adapterctl does "
                           "not match")  # fmt: skip
        if op in (_c.GROUPREF, _c.GROUPREF_EXISTS):
            raise _Refused("uses a backreference, which adapterctl does not match")
        if op in (_c.ASSERT, _c.ASSERT_NOT):
            raise _Refused("uses a lookahead or lookbehind, which adapterctl does not match")
        if op is _ATOMIC or op is _POSSESSIVE:
            raise _Refused("uses an atomic group or a possessive repeat, which adapterctl does "
                           "not match")  # fmt: skip
        raise _Refused(f"uses {str(op).lower()}, which adapterctl does not match")

    def _matcher(self, item: Any, flags: int, state: Any) -> int:
        """The index of a compiled pattern matching the one character ``item`` matches."""
        key = (repr(item), flags)
        found = self._matcher_ids.get(key)
        if found is None:
            sub = _parser.SubPattern(state, [item])
            self.matchers.append(_compiler.compile(sub, flags))
            found = self._matcher_ids[key] = len(self.matchers) - 1
        return found


def _combine_flags(flags: int, add: int, remove: int) -> int:
    """The flags inside ``(?add-remove:…)``, as the standard library combines them."""
    combine = getattr(_compiler, "_combine_flags", None)
    if combine is not None:
        return int(combine(flags, add, remove))
    return (flags | add) & ~remove


class _Dfa:
    """The subset automaton of an ``_Nfa``, built one transition at a time as names need it.

    A state is the set of automaton nodes alive after a prefix of the name, and whether
    PEFT's prefix ``(.*\\.)`` is still possible (no newline read yet): after each dot, every
    key body starts again.
    """

    def __init__(self, nfa: _Nfa, roots: list[int], bodies: list[int], spend: Any) -> None:
        self.nfa = nfa
        self.bodies = bodies
        self.spend = spend
        self.sets: list[frozenset[int]] = []
        self.open: list[bool] = []  # PEFT's prefix may still end at a later dot
        self.trans: list[dict[str, int]] = []
        self.accepts: dict[tuple[int, bool], frozenset[int]] = {}
        self.ids: dict[tuple[frozenset[int], bool], int] = {}
        self._hits: dict[tuple[int, str], bool] = {}
        self.start = self._state(self._closure([*roots, *bodies], begin=True), True)

    def match(self, name: str, trimmed: bool = False) -> frozenset[int]:
        r"""The key positions whose pattern matches all of ``name`` (``trimmed``: a name whose
        final newline was cut off, where ``\Z`` does not hold)."""
        state = self.start
        self.spend(len(name))
        for ch in name:
            nxt = self.trans[state].get(ch)
            if nxt is None:
                nxt = self.trans[state][ch] = self._step(state, ch)
            state = nxt
        if not name:  # an empty name: ``^`` and ``$`` both hold
            return self._accepting(self.sets[state], begin=True, trimmed=trimmed)
        found = self.accepts.get((state, trimmed))
        if found is None:
            found = self._accepting(self.sets[state], begin=False, trimmed=trimmed)
            self.accepts[state, trimmed] = found
        return found

    def _state(self, nodes: frozenset[int], open_: bool) -> int:
        key = (nodes, open_)
        found = self.ids.get(key)
        if found is None:
            found = self.ids[key] = len(self.sets)
            self.sets.append(nodes)
            self.open.append(open_)
            self.trans.append({})
        return found

    def _step(self, state: int, ch: str) -> int:
        nfa = self.nfa
        seeds = [nfa.next[n] for n in self.sets[state] if nfa.kind[n] == _CHAR and self._hit(n, ch)]
        self.spend(len(self.sets[state]))
        if self.open[state] and ch == ".":
            seeds.extend(self.bodies)
        return self._state(self._closure(seeds, begin=False), self.open[state] and ch != "\n")

    def _hit(self, node: int, ch: str) -> bool:
        index = self.nfa.arg[node]
        if index == _ANYTHING:
            return True
        key = (index, ch)
        found = self._hits.get(key)
        if found is None:
            found = self._hits[key] = self.nfa.matchers[index].fullmatch(ch) is not None
        return found

    def _closure(
        self, seeds: Iterable[int], *, begin: bool, end: bool = False, trimmed: bool = False
    ) -> frozenset[int]:
        r"""The nodes reachable from ``seeds`` without reading a character; ``^`` holds when
        ``begin``, ``$`` when ``end`` (otherwise a ``$`` node waits in the set), ``\Z`` when
        ``end`` and not ``trimmed``."""
        nfa = self.nfa
        out: set[int] = set()
        seen: set[int] = set()
        stack = list(seeds)
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            kind = nfa.kind[n]
            if kind == _SPLIT:
                stack.extend(nfa.alts[n])
            elif kind == _AT_BEGIN:
                if begin:
                    stack.append(nfa.next[n])
            elif kind == _AT_END and end:
                if not (trimmed and nfa.arg[n]):
                    stack.append(nfa.next[n])
            else:
                out.add(n)
        self.spend(len(seen) + 1)
        return frozenset(out)

    def _accepting(self, nodes: frozenset[int], *, begin: bool, trimmed: bool) -> frozenset[int]:
        done = self._closure(nodes, begin=begin, end=True, trimmed=trimmed)
        return frozenset(self.nfa.arg[n] for n in done if self.nfa.kind[n] == _ACCEPT)
