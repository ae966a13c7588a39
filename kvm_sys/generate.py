"""Generate ``kvm_sys/bindings.py`` from the machine's KVM UAPI headers.

Why a generator instead of hand-written ctypes: ``struct kvm_run`` and friends are large, full of
anonymous unions and padding, and a single wrong offset silently corrupts guest state.  Deriving
them from the very headers the running kernel was built against (``linux/kvm.h`` which pulls in
``asm/kvm.h``) removes that class of bugs; a test then compares every size and offset against a
gcc-compiled probe.

Pipeline:
  1. ``gcc -E -dD`` preprocesses ``#include <linux/kvm.h>``.  ``-dD`` keeps the ``#define`` lines
     in place, and the line markers tell us which header each struct / macro came from.
  2. The C text (GCC extensions neutralised with ``-D``) is parsed with pycparser; every struct,
     union and enum defined in ``linux/kvm.h`` or ``asm/kvm.h`` becomes a ctypes class / constant.
  3. Object-like ``#define``s from those headers are evaluated by a small C-expression evaluator
     that understands ``sizeof`` of the generated types, so ``_IOWR(KVMIO, 0x05, struct
     kvm_cpuid2)`` becomes ``0xC008AE05`` without compiling anything.

Run ``python -m kvm_sys.generate`` to rewrite the bindings, ``--check`` to verify they are current.
The output depends only on the headers, so it is byte-for-byte deterministic.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycparser import c_ast, c_parser

logger = logging.getLogger(__name__)

OUTPUT = Path(__file__).with_name("bindings.py")

# Headers whose definitions we export.  Matched as path suffixes of gcc's line markers.
HEADER_SUFFIXES = ("/linux/kvm.h", "/asm/kvm.h")

# GCC extensions pycparser does not know.  None of kvm.h's structs use __attribute__ (a probe test
# would catch a packed/aligned layout we got wrong), so erasing it is safe.
GCC_DEFINES = (
    "-D__signed__=signed",
    "-D__extension__=",
    "-D__attribute__(x)=",
    "-D__inline__=",
    "-D__inline=",
    "-D__asm__(x)=",
    "-D__restrict=",
    "-D__restrict__=",
)

# C basic type (sorted specifier words) -> (ctypes name, size)
BASIC_TYPES: dict[tuple[str, ...], str] = {
    ("char",): "ctypes.c_char",
    ("char", "signed"): "ctypes.c_int8",
    ("char", "unsigned"): "ctypes.c_uint8",
    ("short",): "ctypes.c_int16",
    ("int", "short"): "ctypes.c_int16",
    ("short", "signed"): "ctypes.c_int16",
    ("int", "short", "signed"): "ctypes.c_int16",
    ("short", "unsigned"): "ctypes.c_uint16",
    ("int", "short", "unsigned"): "ctypes.c_uint16",
    ("int",): "ctypes.c_int32",
    ("signed",): "ctypes.c_int32",
    ("int", "signed"): "ctypes.c_int32",
    ("unsigned",): "ctypes.c_uint32",
    ("int", "unsigned"): "ctypes.c_uint32",
    ("long",): "ctypes.c_int64",
    ("int", "long"): "ctypes.c_int64",
    ("long", "signed"): "ctypes.c_int64",
    ("int", "long", "signed"): "ctypes.c_int64",
    ("long", "unsigned"): "ctypes.c_uint64",
    ("int", "long", "unsigned"): "ctypes.c_uint64",
    ("long", "long"): "ctypes.c_int64",
    ("int", "long", "long"): "ctypes.c_int64",
    ("long", "long", "signed"): "ctypes.c_int64",
    ("int", "long", "long", "signed"): "ctypes.c_int64",
    ("long", "long", "unsigned"): "ctypes.c_uint64",
    ("int", "long", "long", "unsigned"): "ctypes.c_uint64",
    ("_Bool",): "ctypes.c_bool",
    ("float",): "ctypes.c_float",
    ("double",): "ctypes.c_double",
    ("void",): "None",
}


class GenerateError(RuntimeError):
    """The headers contain something this generator cannot represent faithfully."""


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------

@dataclass
class Define:
    name: str
    params: list[str] | None      # None for object-like macros
    body: str
    file: str


@dataclass
class Preprocessed:
    code: str                      # C text with line markers, #define/#undef removed
    defines: list[Define]          # in order of appearance
    kvm_h_path: str                # resolved path of linux/kvm.h


_LINEMARKER = re.compile(r'^#\s+(\d+)\s+"([^"]*)"')
_DEFINE = re.compile(r"^#define\s+([A-Za-z_]\w*)(\(([^)]*)\))?\s*(.*)$")


def preprocess(cc: str = "gcc") -> Preprocessed:
    """Run gcc -E -dD on ``#include <linux/kvm.h>`` and split code from macro definitions."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kvm_probe.c"
        src.write_text("#include <linux/kvm.h>\n")
        try:
            out = subprocess.run(
                [cc, "-E", "-dD", *GCC_DEFINES, str(src)],
                check=True, capture_output=True, text=True,
            ).stdout
        except FileNotFoundError as e:
            raise GenerateError(f"{cc} not found: the generator needs a C preprocessor") from e
        except subprocess.CalledProcessError as e:
            raise GenerateError(f"{cc} -E failed on linux/kvm.h: {e.stderr.strip()}") from e

    code_lines: list[str] = []
    defines: list[Define] = []
    current = ""
    kvm_h = ""
    for line in out.splitlines():
        m = _LINEMARKER.match(line)
        if m:
            current = m.group(2)
            if current.endswith("/linux/kvm.h") and not kvm_h:
                kvm_h = current
            code_lines.append(line)
            continue
        if line.startswith("#define"):
            d = _DEFINE.match(line)
            if d:
                params = None
                if d.group(2) is not None:
                    params = [p.strip() for p in d.group(3).split(",") if p.strip()]
                defines.append(Define(d.group(1), params, d.group(4).strip(), current))
            code_lines.append("")      # keep line numbers stable for pycparser coords
            continue
        if line.startswith("#undef"):
            code_lines.append("")
            continue
        code_lines.append(line)
    if not kvm_h:
        raise GenerateError("linux/kvm.h not found in the preprocessor output")
    return Preprocessed("\n".join(code_lines) + "\n", defines, kvm_h)


def _from_kvm_header(path: str | None) -> bool:
    return path is not None and path.endswith(HEADER_SUFFIXES)


def headers_version(cc: str = "gcc") -> str:
    """Kernel header version from linux/version.h, e.g. '6.1.192'."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "v.c"
        src.write_text("#include <linux/version.h>\n")
        out = subprocess.run([cc, "-E", "-dM", str(src)], check=True,
                             capture_output=True, text=True).stdout
    parts = {}
    for line in out.splitlines():
        m = re.match(r"#define LINUX_VERSION_(MAJOR|PATCHLEVEL|SUBLEVEL) (\d+)", line)
        if m:
            parts[m.group(1)] = m.group(2)
    if len(parts) == 3:
        return f"{parts['MAJOR']}.{parts['PATCHLEVEL']}.{parts['SUBLEVEL']}"
    m = re.search(r"#define LINUX_VERSION_CODE (\d+)", out)
    if m:
        code = int(m.group(1))
        return f"{code >> 16}.{(code >> 8) & 0xFF}.{code & 0xFF}"
    return "unknown"


# --------------------------------------------------------------------------------------------
# Type model: structs/unions are turned into ctypes at generation time too, so that sizeof()
# in macros can be evaluated with the very layout the generated module will have.
# --------------------------------------------------------------------------------------------

@dataclass
class Field:
    name: str
    ctype: str                 # python expression for the ctypes type (in the generated module)
    bits: int | None = None
    anonymous: bool = False


@dataclass
class Record:
    name: str                  # Python class name (C tag for tagged types)
    kind: str                  # "struct" | "union"
    fields: list[Field] = field(default_factory=list)
    flex: tuple[str, str] | None = None     # (field name, element ctypes expr)
    c_name: str | None = None  # "struct kvm_run" for tagged types; None for anonymous ones
    origin: str = ""


class Model:
    """Collects records, typedefs, enums from the AST in definition order."""

    def __init__(self) -> None:
        self.records: dict[str, Record] = {}          # class name -> record, insertion ordered
        self.tag_to_class: dict[tuple[str, str], str] = {}   # ("struct", tag) -> class name
        self.typedefs: dict[str, c_ast.Node] = {}
        self.enum_consts: dict[str, int] = {}
        self.enum_order: list[tuple[str, int, str]] = []      # (name, value, file)
        self.enum_tags: set[str] = set()
        self._ns: dict[str, object] = {"ctypes": ctypes}     # live ctypes namespace

    # ---- constant expressions -------------------------------------------------------------
    def eval_const(self, node: c_ast.Node) -> int:
        if isinstance(node, c_ast.Constant):
            return _parse_c_int(node.value)
        if isinstance(node, c_ast.ID):
            if node.name in self.enum_consts:
                return self.enum_consts[node.name]
            raise GenerateError(f"unknown identifier {node.name} in constant expression")
        if isinstance(node, c_ast.UnaryOp):
            if node.op == "sizeof":
                return self.sizeof_node(node.expr)
            v = self.eval_const(node.expr)
            return {"-": -v, "+": v, "~": ~v, "!": int(not v)}[node.op]
        if isinstance(node, c_ast.BinaryOp):
            a, b = self.eval_const(node.left), self.eval_const(node.right)
            ops = {"+": a + b, "-": a - b, "*": a * b, "<<": a << b if b >= 0 else 0,
                   ">>": a >> b if b >= 0 else 0, "|": a | b, "&": a & b, "^": a ^ b}
            if node.op in ops:
                return ops[node.op]
            if node.op in ("/", "%"):
                if b == 0:
                    raise GenerateError("division by zero in constant expression")
                q = abs(a) // abs(b) * (1 if (a >= 0) == (b >= 0) else -1)
                return q if node.op == "/" else a - q * b
            raise GenerateError(f"unsupported operator {node.op}")
        if isinstance(node, c_ast.Cast):
            return self.eval_const(node.expr)
        raise GenerateError(f"unsupported constant expression {type(node).__name__}")

    def sizeof_node(self, node: c_ast.Node) -> int:
        if isinstance(node, c_ast.Typename):
            expr = self.type_expr(node.type, owner="_sizeof", hint="t")
            return ctypes.sizeof(eval(expr, self._ns))  # noqa: S307 (our own expression)
        raise GenerateError("sizeof of an expression is not supported")

    # ---- types ----------------------------------------------------------------------------
    def resolve_names(self, names: list[str]) -> str:
        if len(names) == 1 and names[0] in self.typedefs:
            return self.type_expr(self.typedefs[names[0]], owner="_typedef", hint=names[0])
        key = tuple(sorted(names))
        if key not in BASIC_TYPES:
            raise GenerateError(f"unknown type {' '.join(names)}")
        return BASIC_TYPES[key]

    def type_expr(self, t: c_ast.Node, owner: str, hint: str) -> str:
        """Python expression for the ctypes type of declarator ``t``."""
        if isinstance(t, c_ast.TypeDecl):
            return self.type_expr(t.type, owner, hint)
        if isinstance(t, c_ast.IdentifierType):
            return self.resolve_names(t.names)
        if isinstance(t, (c_ast.Struct, c_ast.Union)):
            return self.record(t, owner, hint)
        if isinstance(t, c_ast.Enum):
            if t.values is not None:
                self.enum(t, origin="")
            return "ctypes.c_uint32"       # gcc: unsigned int for non-negative enumerators
        if isinstance(t, c_ast.PtrDecl):
            return "ctypes.c_void_p"
        if isinstance(t, c_ast.ArrayDecl):
            elem = self.type_expr(t.type, owner, hint)
            n = 0 if t.dim is None else self.eval_const(t.dim)
            if n < 0:
                raise GenerateError(f"negative array size in {owner}")
            return f"({elem} * {n})"
        if isinstance(t, c_ast.FuncDecl):
            return "ctypes.c_void_p"
        raise GenerateError(f"unsupported type node {type(t).__name__} in {owner}")

    def enum(self, e: c_ast.Enum, origin: str) -> None:
        if e.name:
            if e.name in self.enum_tags:
                return
            self.enum_tags.add(e.name)
        nxt = 0
        for en in e.values.enumerators:
            if en.value is not None:
                nxt = self.eval_const(en.value)
            self.enum_consts[en.name] = nxt
            self.enum_order.append((en.name, nxt, origin))
            nxt += 1

    def record(self, s: c_ast.Struct | c_ast.Union, owner: str, hint: str) -> str:
        kind = "struct" if isinstance(s, c_ast.Struct) else "union"
        if s.decls is None:
            # Reference to a (possibly forward-declared) tagged type.
            key = (kind, s.name)
            if key not in self.tag_to_class:
                raise GenerateError(f"{kind} {s.name} used before its definition (in {owner})")
            return self.tag_to_class[key]
        if s.name:
            cls = s.name
            key = (kind, s.name)
            if key in self.tag_to_class:
                return self.tag_to_class[key]
        else:
            cls = f"{owner}_{hint}"
        if cls in self.records or cls in BASIC_TYPES:
            raise GenerateError(f"class name collision: {cls}")
        rec = Record(cls, kind, c_name=f"{kind} {s.name}" if s.name else None,
                     origin=s.coord.file if s.coord else "")
        anon_n = 0
        for d in s.decls:
            if isinstance(d.type, c_ast.TypeDecl) or d.name:
                name = d.name
                expr = self.type_expr(d.type, cls, name)
                bits = self.eval_const(d.bitsize) if d.bitsize is not None else None
                rec.fields.append(Field(name, expr, bits))
            else:
                # Anonymous struct/union member: promoted with ctypes' _anonymous_.
                name = f"_anon{anon_n}"
                anon_n += 1
                expr = self.type_expr(d.type, cls, name.lstrip("_"))
                rec.fields.append(Field(name, expr, None, anonymous=True))
        rec.flex = self._find_flex(rec)
        self._materialise(rec)
        self.records[cls] = rec
        if s.name:
            self.tag_to_class[(kind, s.name)] = cls
        return cls

    def _find_flex(self, rec: Record) -> tuple[str, str] | None:
        """A trailing ``T x[]`` / ``T x[0]``, directly or through a trailing anonymous member."""
        if not rec.fields or rec.kind != "struct":
            return None
        last = rec.fields[-1]
        m = re.fullmatch(r"\((.*) \* 0\)", last.ctype)
        if m and not last.anonymous:
            return (last.name, m.group(1))
        if last.anonymous and last.ctype in self.records:
            return self.records[last.ctype].flex
        return None

    def _materialise(self, rec: Record) -> None:
        """Build the live ctypes class (needed for sizeof in later expressions and macros)."""
        base = ctypes.Structure if rec.kind == "struct" else ctypes.Union
        ns = self._ns
        cls: Any = type(rec.name, (base,), {})   # a ctypes class built at run time
        anon = tuple(f.name for f in rec.fields if f.anonymous)
        if anon:
            cls._anonymous_ = anon
        fields = []
        for f in rec.fields:
            t = eval(f.ctype, ns)  # noqa: S307 (our own expression)
            fields.append((f.name, t) if f.bits is None else (f.name, t, f.bits))
        cls._fields_ = fields
        ns[rec.name] = cls

    def live(self, name: str) -> type:
        return self._ns[name]  # type: ignore[return-value]


def _parse_c_int(text: str) -> int:
    t = text.rstrip("uUlL")
    if t.startswith(("'",)):
        raise GenerateError(f"character constant {text} not supported")
    if t.lower().startswith("0x"):
        return int(t, 16)
    if t.lower().startswith("0b"):
        return int(t, 2)
    if len(t) > 1 and t.startswith("0"):
        return int(t, 8)
    return int(t, 10)


def build_model(pre: Preprocessed) -> Model:
    ast = c_parser.CParser().parse(pre.code, "kvm.i")
    model = Model()
    for ext in ast.ext:
        origin = ext.coord.file if ext.coord else ""
        if isinstance(ext, c_ast.Typedef):
            model.typedefs[ext.name] = ext.type
            continue
        if not isinstance(ext, c_ast.Decl):
            continue
        t = ext.type
        if isinstance(t, c_ast.Enum) and t.values is not None:
            if _from_kvm_header(origin):
                model.enum(t, origin)
            continue
        if isinstance(t, (c_ast.Struct, c_ast.Union)) and t.decls is not None:
            # Struct definitions outside the KVM headers are materialised lazily if referenced.
            if _from_kvm_header(origin):
                model.record(t, owner="_top", hint="anon")
    return model


# --------------------------------------------------------------------------------------------
# Macro evaluation
# --------------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(0[xX][0-9a-fA-F]+[uUlL]*|\d+[uUlL]*)|([A-Za-z_]\w*)|(<<|>>|&&|\|\||==|!=|<=|>=|##|"
    r"[-+*/%&|^~!()<>,?:#\[\].\"']))"
)


def tokenize(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos or m.lastindex is None:
            raise GenerateError(f"cannot tokenize {text!r}")
        out.append(m.group(m.lastindex))
        pos = m.end()
    return out


class MacroEvaluator:
    """Evaluates object-like macros to integers (C semantics for the subset kvm.h uses)."""

    TYPE_WORDS = {"struct", "union", "enum", "signed", "unsigned", "char", "short", "int",
                  "long", "void", "_Bool"}

    def __init__(self, defines: list[Define], model: Model) -> None:
        self.macros: dict[str, Define] = {}
        for d in defines:
            self.macros[d.name] = d           # later definitions win, as in the preprocessor
        self.model = model

    def expand(self, tokens: list[str], hide: frozenset[str]) -> list[str]:
        out: list[str] = []
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            d = self.macros.get(tok)
            if d is None or tok in hide:
                out.append(tok)
                i += 1
                continue
            if d.params is None:
                out.extend(self.expand(tokenize(d.body), hide | {tok}))
                i += 1
                continue
            if i + 1 >= len(tokens) or tokens[i + 1] != "(":
                out.append(tok)
                i += 1
                continue
            args, i = self._collect_args(tokens, i + 2)
            if len(args) != len(d.params) and not (not d.params and args == [[]]):
                raise GenerateError(f"macro {tok} expects {len(d.params)} args")
            body = tokenize(d.body)
            if "#" in body:
                raise GenerateError(f"macro {tok} stringizes (#)")
            raw_args = dict(zip(d.params, args))
            expanded_args = {p: self.expand(a, hide) for p, a in zip(d.params, args)}
            subst: list[str] = []
            k = 0
            while k < len(body):
                bt = body[k]
                if k + 2 < len(body) + 0 and body[k + 1] == "##":
                    # Token pasting uses the unexpanded arguments (C11 6.10.3.3).
                    left = raw_args.get(bt, [bt])
                    right = raw_args.get(body[k + 2], [body[k + 2]])
                    pasted = (left[-1] if left else "") + (right[0] if right else "")
                    subst.extend(left[:-1] + tokenize(pasted) + right[1:])
                    k += 3
                    continue
                subst.extend(expanded_args.get(bt, [bt]))
                k += 1
            out.extend(self.expand(subst, hide | {tok}))
        return out

    @staticmethod
    def _collect_args(tokens: list[str], i: int) -> tuple[list[list[str]], int]:
        args: list[list[str]] = [[]]
        depth = 0
        while i < len(tokens):
            t = tokens[i]
            if t == "(":
                depth += 1
            elif t == ")":
                if depth == 0:
                    return args, i + 1
                depth -= 1
            elif t == "," and depth == 0:
                args.append([])
                i += 1
                continue
            args[-1].append(t)
            i += 1
        raise GenerateError("unterminated macro call")

    def _type_size(self, toks: list[str]) -> int | None:
        """Size of a type name, or None if the tokens are not a type."""
        if not toks:
            return None
        if toks[0] in ("struct", "union") and len(toks) == 2:
            cls = self.model.tag_to_class.get((toks[0], toks[1]))
            if cls is None:
                raise GenerateError(f"sizeof({' '.join(toks)}): unknown type")
            return ctypes.sizeof(self.model.live(cls))
        if all(t in self.TYPE_WORDS for t in toks) or (len(toks) == 1 and toks[0] in self.model.typedefs):
            if toks[-1] == "*":
                return 8
            expr = self.model.resolve_names(toks)
            return ctypes.sizeof(eval(expr, self.model._ns))  # noqa: S307
        if len(toks) >= 2 and toks[-1] == "*":
            return 8
        return None

    def evaluate(self, name: str) -> int:
        toks = self.expand(tokenize(self.macros[name].body), frozenset({name}))
        # sizeof(type) and casts "(type)" are resolved on the expanded token list.
        out: list[str] = []
        i = 0
        while i < len(toks):
            t = toks[i]
            if t == "sizeof":
                if i + 1 >= len(toks) or toks[i + 1] != "(":
                    raise GenerateError("sizeof without parentheses")
                inner, j = self._collect_args(toks, i + 2)
                if len(inner) != 1:
                    raise GenerateError("bad sizeof")
                size = self._type_size(inner[0])
                if size is None:
                    raise GenerateError(f"sizeof({' '.join(inner[0])}) unsupported")
                out.append(str(size))
                i = j
                continue
            if t == "(":
                # A cast: '(' type ')' followed by an operand.
                j = i + 1
                while j < len(toks) and toks[j] != ")" and toks[j] != "(":
                    j += 1
                if j < len(toks) and toks[j] == ")" and j > i + 1:
                    inner_t = toks[i + 1:j]
                    if self._is_type(inner_t) and j + 1 < len(toks) and toks[j + 1] not in (
                            ")", "|", "&", "<<", ">>", "+", "*", "/", ",", "^"):
                        # Cast: wrap the operand (a parenthesised group or one token) in a
                        # width/sign conversion so (__u32)(-1) is 0xFFFFFFFF as in C.
                        start = j + 1
                        end = start + 1
                        if toks[start] == "(":
                            _, end = self._collect_args(toks, start + 1)
                        conv = self._cast_fn(inner_t)
                        out.extend([conv, "("] + toks[start:end] + [")"])
                        i = end
                        continue
            out.append(t)
            i += 1
        return self._eval_tokens(out)

    def _cast_fn(self, toks: list[str]) -> str:
        if toks[-1] == "*":
            return "_cast_u64"
        expr = self.model.resolve_names(toks)
        t = eval(expr, self.model._ns)  # noqa: S307
        signed = t in (ctypes.c_int8, ctypes.c_int16, ctypes.c_int32, ctypes.c_int64, ctypes.c_char)
        return f"_cast_{'s' if signed else 'u'}{ctypes.sizeof(t) * 8}"

    def _is_type(self, toks: list[str]) -> bool:
        return (all(t in self.TYPE_WORDS or t == "*" for t in toks)
                or (len(toks) == 1 and toks[0] in self.model.typedefs)
                or (toks[0] in ("struct", "union")))

    def _eval_tokens(self, toks: list[str]) -> int:
        py: list[str] = []
        unsigned_bits = 0       # widest unsigned literal seen: C converts the result to it
        for t in toks:
            if t[0].isdigit():
                suffix = t[len(t.rstrip("uUlL")):].lower()
                if "u" in suffix:
                    unsigned_bits = max(unsigned_bits, 64 if "l" in suffix else 32)
                py.append(str(_parse_c_int(t)))
            elif t.startswith("_cast_"):
                py.append(t)
            elif t in self.model.enum_consts:
                py.append(str(self.model.enum_consts[t]))
            elif t == "/":
                py.append("//")
            elif t == "&&":
                py.append(" and ")
            elif t == "||":
                py.append(" or ")
            elif t == "!":
                py.append(" not ")
            elif t in ("(", ")", "+", "-", "*", "%", "<<", ">>", "|", "&", "^", "~",
                       "==", "!=", "<", ">", "<=", ">="):
                py.append(t)
            else:
                raise GenerateError(f"cannot evaluate token {t!r}")
        if not py:
            raise GenerateError("empty expression")
        expr = " ".join(py)
        if not re.fullmatch(r"[0-9 ()+\-*/%<>|&^~=!a-z_]*", expr):
            raise GenerateError(f"refusing to evaluate {expr!r}")
        value = eval(expr, {"__builtins__": {}}, dict(_CASTS))  # noqa: S307 (digits/operators)
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, int):
            raise GenerateError(f"non-integer result for {expr!r}")
        if value < 0 and unsigned_bits:
            value &= (1 << unsigned_bits) - 1
        return value


def _make_cast(bits: int, signed: bool):
    mask = (1 << bits) - 1

    def cast(v: int) -> int:
        v &= mask
        if signed and v >> (bits - 1):
            v -= 1 << bits
        return v
    return cast


_CASTS = {f"_cast_{'s' if s else 'u'}{b}": _make_cast(b, s) for b in (8, 16, 32, 64) for s in (True, False)}


# --------------------------------------------------------------------------------------------
# Emission
# --------------------------------------------------------------------------------------------

# A #define whose whole body is one _IO/_IOR/_IOW/_IOWR(...) call: an ioctl request number.
_IOCTL_BODY = re.compile(r"_IO(R|W|WR)?\s*\(.*\)$")


def _fmt_const(value: int, body: str) -> str:
    if value < 0:
        return str(value)
    if "0x" in body.lower() or "_IO" in body or value >= 0x10000:
        return f"0x{value:X}"
    return str(value)


def render(cc: str = "gcc") -> str:
    pre = preprocess(cc)
    model = build_model(pre)
    version = headers_version(cc)
    ev = MacroEvaluator(pre.defines, model)

    lines: list[str] = [
        f"# Generated by kvm_sys/generate.py from {pre.kvm_h_path} (kernel headers {version}); "
        "do not edit.",
        '"""ctypes bindings for the KVM UAPI (linux/kvm.h + asm/kvm.h).',
        "",
        "Regenerate with ``python -m kvm_sys.generate``; ``tests/test_kvm_sys_layout.py`` checks every",
        "size and offset against a gcc-compiled probe.  Anonymous unions/structs are promoted with",
        "``_anonymous_`` (their members are reachable directly, as in C).  Structs ending in a flexible",
        "array carry ``_flex_ = (field, element type)``; see ``kvm_sys.flex``.",
        '"""',
        "",
        "import ctypes",
        "",
        f"KERNEL_HEADERS_VERSION = {version!r}",
        "",
        "# ---- structs and unions " + "-" * 70,
        "",
    ]
    struct_names: list[str] = []
    for rec in model.records.values():
        if rec.name.startswith("_sizeof") or rec.name.startswith("_typedef"):
            continue
        base = "ctypes.Structure" if rec.kind == "struct" else "ctypes.Union"
        lines.append("")
        lines.append(f"class {rec.name}({base}):")
        if rec.c_name:
            lines.append(f'    """{rec.c_name}"""')
        else:
            lines.append('    """(anonymous member type)"""')
        anon = [f.name for f in rec.fields if f.anonymous]
        if anon:
            lines.append(f"    _anonymous_ = ({', '.join(repr(a) for a in anon)},)")
        if rec.flex:
            lines.append(f"    _flex_ = ({rec.flex[0]!r}, {rec.flex[1]})")
        if not rec.fields:
            lines.append("    _fields_ = []")
        else:
            lines.append("    _fields_ = [")
            for f in rec.fields:
                if f.bits is None:
                    lines.append(f"        ({f.name!r}, {f.ctype}),")
                else:
                    lines.append(f"        ({f.name!r}, {f.ctype}, {f.bits}),")
            lines.append("    ]")
        lines.append("")
        if rec.c_name:
            struct_names.append(rec.name)

    lines.append("")
    lines.append("# C tag name -> class, for every named struct/union above (used by the layout test).")
    lines.append("TAGGED_TYPES = {")
    for rec in model.records.values():
        if rec.c_name:
            lines.append(f"    {rec.c_name!r}: {rec.name},")
    lines.append("}")
    lines.append("")
    lines.append("# ---- enumerators " + "-" * 76)
    lines.append("")
    seen: set[str] = set()
    for name, value, origin in model.enum_order:
        if not _from_kvm_header(origin) or name in seen:
            continue
        seen.add(name)
        lines.append(f"{name} = {value}")
    lines.append("")
    lines.append("# ---- #define constants (evaluated; original text in the comment) " + "-" * 26)
    current_file = None
    emitted: dict[str, int] = {}
    ioctls: dict[int, list[str]] = {}          # request number -> ioctl names, in header order
    for d in pre.defines:
        if not _from_kvm_header(d.file) or d.params is not None or d.name.startswith("_"):
            continue
        if not d.body:
            continue
        try:
            value = ev.evaluate(d.name)
        except GenerateError as e:
            logger.debug("skipping %s: %s", d.name, e)
            continue
        if d.name in seen or d.name in model.records:
            continue
        if d.file != current_file:
            lines.append("")
            lines.append(f"# from {d.file}")
            current_file = d.file
        body = " ".join(d.body.split())
        seen.add(d.name)
        emitted[d.name] = value
        lines.append(f"{d.name} = {_fmt_const(value, body)}  # {body}")
        if _IOCTL_BODY.match(body):
            ioctls.setdefault(value, []).append(d.name)
    lines.append("")
    lines.append("# ---- ioctl request number -> name " + "-" * 60)
    lines.append("# Every constant above defined by an _IO/_IOR/_IOW/_IOWR macro, so a caller names an ioctl")
    lines.append("# once (by its constant) and error messages still say which one failed.  Numbers that two")
    lines.append("# headers' ioctls share (architectures reuse slots) map to both names.")
    lines.append("IOCTL_NAMES = {")
    for names in ioctls.values():
        lines.append(f"    {names[0]}: {' or '.join(names)!r},")
    lines.append("}")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvm_sys.generate", description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if the bindings file differs from what would be generated")
    ap.add_argument("--output", type=Path, default=OUTPUT)
    ap.add_argument("--cc", default=os.environ.get("CC", "gcc"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        text = render(args.cc)
    except GenerateError as e:
        logger.error("generate failed: %s", e)
        return 2
    if args.check:
        current = args.output.read_text() if args.output.exists() else None
        if current != text:
            logger.error("%s is out of date; run python -m kvm_sys.generate", args.output)
            return 1
        logger.info("%s is up to date", args.output)
        return 0
    tmp = args.output.with_suffix(".py.tmp")
    tmp.write_text(text)
    os.replace(tmp, args.output)
    logger.info("wrote %s (%d lines)", args.output, text.count("\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
