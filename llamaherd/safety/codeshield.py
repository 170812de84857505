"""Code Shield: find insecure code in a model's output before it reaches the user.

    scan_code(text, language=None) -> {"is_insecure", "issues", "recommended_treatment", "language",
                                       "scanned_blocks"}

How a text is scanned:

1. Blocks. Markdown fences (``` or ~~~, closed or not) are found and each block is scanned on its own;
   the prose around them is not. A text without fences is one block. Line numbers are lines of the whole
   input text, counted from 1.
2. Language of a block: a fence's info string naming a language we have rules for (```python, ```c++,
   ```main.rs) wins; then the ``language`` argument; then a guess from the content (weighted signals such as
   ``#include <iostream>``, ``fn main``, ``<?php``). A fence tagged with another language (```bash, ```sql)
   gets only the language-agnostic rules (secrets, keys); a block whose language cannot be guessed gets every
   language's rules, as Meta's Code Shield does when it is given no language.
3. Regex layer. Comments are blanked out (strings are kept, offsets preserved), then each rule of the
   language runs its regex. Some rules also need a pattern elsewhere in the block (``requires``), are
   suppressed by one (``unless``), or need words of a security context near the match (``context``: a
   ``random()`` only matters when it makes a token or a password). Rules about request data (``taint``: XSS,
   path traversal, redirects, file inclusion) follow it through up to three assignments
   (``$f = $_GET['f']; $p = "docs/" . $f; readfile($p);``) and stop at a sanitiser.
4. Deeper layer, Python only: a rule with an ``ast`` check runs it only when its regex matched; when the block
   parses, the syntax tree decides (``subprocess.run(cmd, shell=True)`` with a constant command is safe,
   with a formatted one is not; SQL built by f-string, ``%`` or ``+`` and then executed; values from a web
   request reaching ``open`` or an HTML response). When the block does not parse (LLM output is often a
   fragment), the regex's verdict stands.

Severity and treatment: ``error`` means the code as written lets input reach a dangerous operation or turns a
protection off (injection, unsafe deserialisation, disabled certificate checks); ``warning`` means a weak or
risky primitive whose danger depends on how it is used (MD5, ``strcpy``, a hard-coded password). Any error ->
``recommended_treatment`` "block"; only warnings -> "warn"; no issue -> "ignore". ``is_insecure`` is true
when there is any issue.

Every rule carries one insecure example it must flag and one similar safe example it must not flag
(``Rule.positive`` / ``Rule.negative``); tests/test_codeshield.py runs them all.
"""

from __future__ import annotations

import ast
import bisect
import re
import textwrap
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

from llamaherd.errors import HerdError

LANGUAGES = ("python", "c", "cpp", "javascript", "java", "php", "rust", "csharp")
SEVERITIES = ("error", "warning")
TREATMENT = {"error": "block", "warning": "warn"}  # the worst severity found decides; none -> "ignore"

ALIASES = {
    "python": "python", "py": "python", "python3": "python", "py3": "python", "ipython": "python",
    "c": "c", "h": "c",
    "cpp": "cpp", "c++": "cpp", "cxx": "cpp", "cc": "cpp", "hpp": "cpp", "hh": "cpp", "hxx": "cpp",
    "javascript": "javascript", "js": "javascript", "jsx": "javascript", "mjs": "javascript", "cjs": "javascript",
    "node": "javascript", "nodejs": "javascript", "typescript": "javascript", "ts": "javascript",
    "tsx": "javascript",
    "java": "java",
    "php": "php",
    "rust": "rust", "rs": "rust",
    "csharp": "csharp", "cs": "csharp", "c#": "csharp",
}

# --- the rules ----------------------------------------------------------------------------------------------

# words that make a random number a secret: a weak generator only matters in their company
SECRET_CONTEXT = (r"(?i)passw|passphrase|pwd|token|secret|salt|nonce|\botp\b|api_?key|apikey|session_?id|"
                  r"sessionid|csrf|reset_?code|verification|auth_?code|crypt|(?:private|session|signing|encryption|aes|hmac|"
                  r"master|auth)_?key|\bkeys?\b")
SQL_TEXT = r"(?:SELECT\b[^\"'`\n]*?\bFROM|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|WHERE\b)"


@dataclass(frozen=True)
class Rule:
    """One insecure pattern: where it applies, how it is found, how bad it is, and an example of each side."""

    id: str
    languages: tuple[str, ...]  # the languages whose blocks it runs on; ALL for language-agnostic rules
    cwe: str
    severity: str  # "error" or "warning"
    description: str
    pattern: str  # the regex over comment-free code; with `ast`, only the pre-scan that decides whether it runs
    positive: str  # insecure code this rule must flag
    negative: str  # similar, safe code that must pass every rule
    requires: str | None = None  # the block must also match this somewhere
    unless: str | None = None  # a match anywhere in the block (a mitigation) suppresses the rule
    context: str | None = None  # must match within a few lines of the hit
    taint: str | None = None  # findings are where this matches, {T} standing for request data (see TAINT)
    ast: Callable[[PyBlock], list[int]] | None = None  # Python: block-relative lines of the real findings


# --- Python syntax-tree checks -------------------------------------------------------------------------------

SHELL_CALLS = {"subprocess.run", "subprocess.call", "subprocess.Popen", "subprocess.check_call",
               "subprocess.check_output"}
SHELL_STRING_CALLS = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
                      "commands.getoutput", "os.popen2", "os.popen3"}
DESERIALIZE_CALLS = {"pickle.load", "pickle.loads", "cPickle.load", "cPickle.loads", "_pickle.loads",
                     "dill.load", "dill.loads", "jsonpickle.decode", "marshal.load", "marshal.loads",
                     "shelve.open", "pandas.read_pickle", "joblib.load"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader"}
SQL_METHODS = {"execute", "executemany", "executescript", "raw", "read_sql", "read_sql_query", "text"}
WEB_SOURCES = {"args", "form", "values", "json", "get_json", "data", "files", "cookies", "headers", "GET",
               "POST", "FILES", "COOKIES", "query_params", "path_params", "body", "query_string"}
SANITIZERS = {"escape", "secure_filename", "basename", "int", "float", "bool", "quote", "clean", "len",
              "UUID", "urlencode", "quote_plus"}
PATH_SINKS = {"open", "io.open", "flask.send_file", "os.path.join", "pathlib.Path", "os.remove", "os.unlink",
              "shutil.rmtree", "os.listdir", "fastapi.responses.FileResponse", "starlette.responses.FileResponse"}
PATH_GUARDS = {"secure_filename", "safe_join", "send_from_directory", "basename", "realpath", "commonpath",
               "is_relative_to", "startswith", "resolve", "abspath"}
HTTP_CALLS = {"requests.get", "requests.post", "requests.put", "requests.delete", "requests.head",
              "requests.request", "httpx.get", "httpx.post", "urllib.request.urlopen", "urllib.request.Request"}
WEAK_HASHES = {"hashlib.md5", "hashlib.sha1", "hashlib.md4", "Crypto.Hash.MD5.new", "Crypto.Hash.SHA1.new",
               "Crypto.Hash.MD4.new", "Cryptodome.Hash.MD5.new", "Cryptodome.Hash.SHA1.new"}
FAST_HASHES = {"hashlib.sha256", "hashlib.sha512", "hashlib.sha224", "hashlib.sha384", "hashlib.blake2b",
               "hashlib.blake2s", "hashlib.sha3_256", "hashlib.sha3_512"}


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain (calls in the chain read as ``f()``), '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else ""
    if isinstance(node, ast.Call):
        head = _dotted(node.func)
        return f"{head}()" if head else ""
    return ""


def _kwarg(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and bool(node.value) is True


def _is_false(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value in (False, 0, None)


class PyBlock:
    """One Python block's syntax tree, with what the checks share: import aliases, calls, constants, taint."""

    def __init__(self, tree: ast.Module):
        self.tree = tree
        self.nodes = list(ast.walk(tree))

    @cached_property
    def aliases(self) -> dict[str, str]:
        """Local name -> full dotted name, from the imports (``import subprocess as sp``, ``from os import
        system``, ``import pandas as pd``)."""
        out = {"pd": "pandas", "np": "numpy"}
        for n in self.nodes:
            if isinstance(n, ast.Import):
                for a in n.names:
                    out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(n, ast.ImportFrom) and n.module:
                for a in n.names:
                    out[a.asname or a.name] = f"{n.module}.{a.name}"
        return out

    def qualname(self, node: ast.AST) -> str:
        name = _dotted(node)
        head, _, rest = name.partition(".")
        full = self.aliases.get(head, head)
        return f"{full}.{rest}" if rest else full

    @cached_property
    def calls(self) -> list[tuple[str, ast.Call]]:
        return [(self.qualname(n.func), n) for n in self.nodes if isinstance(n, ast.Call)]

    @cached_property
    def assignments(self) -> dict[str, list[ast.expr]]:
        """Every value assigned to each plain name (``x = ...``, ``x += ...``), anywhere in the block."""
        out: dict[str, list[ast.expr]] = {}
        for n in self.nodes:
            if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and n.value is not None:
                targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        out.setdefault(t.id, []).append(n.value)
        return out

    def constant(self, node: ast.expr | None, depth: int = 0) -> bool:
        """A value fixed by the code itself: literals, f-strings without fields, names only ever assigned such
        values, and conditionals, sums, lists and tuples of them."""
        if node is None or depth > 4:
            return False
        if isinstance(node, ast.Constant):
            return True
        if isinstance(node, ast.JoinedStr):
            return all(isinstance(v, ast.Constant) for v in node.values)
        if isinstance(node, ast.IfExp):
            return self.constant(node.body, depth + 1) and self.constant(node.orelse, depth + 1)
        if isinstance(node, ast.BinOp):
            return self.constant(node.left, depth + 1) and self.constant(node.right, depth + 1)
        if isinstance(node, (ast.List, ast.Tuple)):
            return all(self.constant(e, depth + 1) for e in node.elts)
        if isinstance(node, ast.Name):
            values = self.assignments.get(node.id)
            return bool(values) and all(self.constant(v, depth + 1) for v in values)
        return False

    def formatted(self, node: ast.expr | None, depth: int = 0) -> bool:
        """A string built from values at run time: an f-string with a field, ``"..." % x``, ``"..." + x``,
        ``"...".format(x)``, or a name assigned such a string. Fields that are UPPER_CASE constants or
        constant values do not count."""
        if node is None or depth > 4:
            return False
        if isinstance(node, ast.JoinedStr):
            return any(isinstance(v, ast.FormattedValue) and not self._fixed(v.value) for v in node.values)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mod, ast.Add)):
            parts = (node.left, node.right)
            stringy = any(isinstance(p, (ast.Constant, ast.JoinedStr)) and not isinstance(getattr(p, "value", ""),
                          (int, float)) or self.formatted(p, depth + 1) for p in parts)
            return stringy and not all(self._fixed(p) for p in parts)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
            args = [*node.args, *(k.value for k in node.keywords)]
            return not all(self._fixed(a) for a in args)
        if isinstance(node, ast.Name):
            return any(self.formatted(v, depth + 1) for v in self.assignments.get(node.id, []))
        return False

    def _fixed(self, node: ast.expr) -> bool:
        return self.constant(node) or (isinstance(node, ast.Name) and node.id.isupper())

    # -- values from a web request ----------------------------------------------------------------------

    @cached_property
    def functions(self) -> list[ast.AST]:
        """Route handlers and other functions, plus the module itself (scripts keep code at top level)."""
        return [self.tree, *(n for n in self.nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))]

    def tainted(self, func: ast.AST) -> set[str]:
        """Names in ``func`` holding data from a web request: ``request.args``/``form``/``json``/... (Flask,
        Django, Starlette) and the path parameters of a route (``@app.route("/f/<name>")``), followed through
        assignments; a sanitiser (``escape``, ``secure_filename``, ``int``, ...) ends the trail."""
        names: set[str] = set()
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) and self._is_route(func):
            args = func.args.args
            defaults = [None] * (len(args) - len(func.args.defaults)) + list(func.args.defaults)
            for a, d in zip(args, defaults):
                if a.arg not in ("self", "request", "db", "session") and not (
                        isinstance(d, ast.Call) and _dotted(d.func).endswith("Depends")):
                    names.add(a.arg)
        body = [n for n in ast.walk(func) if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.For))]
        body.sort(key=lambda n: n.lineno)
        for _ in range(2):  # twice, for values assigned in a loop before their use
            for n in body:
                value = n.iter if isinstance(n, ast.For) else n.value
                if value is not None and self.carries(value, names):
                    targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                    for t in targets:
                        names.update(x.id for x in ast.walk(t) if isinstance(x, ast.Name))
        return names

    @staticmethod
    def _is_route(func: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
        verbs = ("route", "get", "post", "put", "delete", "patch", "api_route")
        return any(_dotted(d.func if isinstance(d, ast.Call) else d).rsplit(".", 1)[-1] in verbs
                   for d in func.decorator_list)

    def carries(self, node: ast.AST, names: set[str]) -> bool:
        """Whether an expression holds request data (a source, or a tainted name) not passed through a
        sanitiser."""
        if isinstance(node, ast.Call) and _dotted(node.func).rsplit(".", 1)[-1] in SANITIZERS:
            return False
        if isinstance(node, ast.Name):
            return node.id in names
        if isinstance(node, ast.Attribute):
            parts = _dotted(node).split(".")
            if len(parts) >= 2 and parts[0] == "request" and parts[1] in WEB_SOURCES:
                return True
        return any(self.carries(c, names) for c in ast.iter_child_nodes(node))

    def function_of(self, line: int) -> ast.AST:
        inner = [f for f in self.functions[1:] if f.lineno <= line <= (f.end_lineno or f.lineno)]
        return max(inner, key=lambda f: f.lineno) if inner else self.tree

    def names_in(self, func: ast.AST) -> set[str]:
        out = set()
        for n in ast.walk(func):
            if isinstance(n, ast.Name):
                out.add(n.id)
            elif isinstance(n, ast.Attribute):
                out.add(n.attr)
        return out

    def tainted_calls(self, sinks: set[str], guards: set[str] = frozenset()) -> list[int]:
        """Lines of calls to ``sinks`` with request data in an argument, in functions using none of ``guards``."""
        lines = []
        for name, call in self.calls:
            # a bare or imported name matches by its last part (flask's redirect); a method call must match whole
            if name in sinks or (isinstance(call.func, ast.Name) and name.rsplit(".", 1)[-1] in sinks):
                func = self.function_of(call.lineno)
                if self.names_in(func) & guards:
                    continue
                taint = self.tainted(func)
                if any(self.carries(a, taint) for a in [*call.args, *(k.value for k in call.keywords)]):
                    lines.append(call.lineno)
        return lines


def _ast_shell(b: PyBlock) -> list[int]:
    lines = []
    for name, call in b.calls:
        if name in SHELL_CALLS and _kwarg(call, "shell") is not None and not _is_false(_kwarg(call, "shell")):
            command = call.args[0] if call.args else _kwarg(call, "args")
            if not b.constant(command):
                lines.append(call.lineno)
    return lines


def _ast_os_system(b: PyBlock) -> list[int]:
    return [c.lineno for name, c in b.calls if name in SHELL_STRING_CALLS and c.args and not b.constant(c.args[0])]


def _ast_eval(b: PyBlock) -> list[int]:
    return [c.lineno for _, c in b.calls if isinstance(c.func, ast.Name) and c.func.id in ("eval", "exec")
            and c.args and not b.constant(c.args[0])]


def _from_outside(b: PyBlock, call: ast.Call) -> bool:
    """Whether a call's arguments hold data from a web request or straight off a socket."""
    taint = b.tainted(b.function_of(call.lineno))
    args = [*call.args, *(k.value for k in call.keywords)]
    return any(b.carries(a, taint) or any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and
                                          n.func.attr in ("recv", "recvfrom", "recv_bytes") for n in ast.walk(a))
               for a in args)


def _ast_deserialize_untrusted(b: PyBlock) -> list[int]:
    return [c.lineno for name, c in b.calls if name in DESERIALIZE_CALLS and _from_outside(b, c)]


def _ast_deserialize(b: PyBlock) -> list[int]:
    lines = []
    for name, call in b.calls:
        if name in DESERIALIZE_CALLS and _from_outside(b, call):
            continue  # py-deserialize-untrusted reports it
        if name in DESERIALIZE_CALLS:
            lines.append(call.lineno)
        elif name == "torch.load" and getattr(_kwarg(call, "weights_only"), "value", None) is False:
            lines.append(call.lineno)
        elif name == "numpy.load" and _is_true(_kwarg(call, "allow_pickle")):
            lines.append(call.lineno)
    return lines


def _ast_yaml(b: PyBlock) -> list[int]:
    lines = []
    for name, call in b.calls:
        if name in ("yaml.unsafe_load", "yaml.unsafe_load_all"):
            lines.append(call.lineno)
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _kwarg(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
            if loader is None or _dotted(loader).rsplit(".", 1)[-1] not in SAFE_YAML_LOADERS:
                lines.append(call.lineno)
    return lines


def _ast_sql(b: PyBlock) -> list[int]:
    lines = []
    for _, call in b.calls:
        method = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
        if method in SQL_METHODS and call.args and b.formatted(call.args[0]):
            lines.append(call.lineno)
    return lines


def _ast_weak_hash(b: PyBlock) -> list[int]:
    lines = []
    for name, call in b.calls:
        if _is_false(_kwarg(call, "usedforsecurity")):
            continue
        weak_new = name == "hashlib.new" and call.args and isinstance(call.args[0], ast.Constant) and \
            str(call.args[0].value).lower() in ("md5", "sha1", "md4")
        if name in WEAK_HASHES or weak_new:
            lines.append(call.lineno)
    return lines


def _ast_fast_password_hash(b: PyBlock) -> list[int]:
    def mentions_password(node: ast.AST) -> bool:
        return any(re.search(r"(?i)passw|pwd", _dotted(n)) for n in ast.walk(node)
                   if isinstance(n, (ast.Name, ast.Attribute)))
    return [c.lineno for name, c in b.calls if name in FAST_HASHES and any(mentions_password(a) for a in c.args)]


def _ast_template(b: PyBlock) -> list[int]:
    return [c.lineno for name, c in b.calls if name.rsplit(".", 1)[-1] == "render_template_string"
            and c.args and not b.constant(c.args[0])]


def _ast_path_traversal(b: PyBlock) -> list[int]:
    return b.tainted_calls(PATH_SINKS | {"send_file", "FileResponse", "Path"}, PATH_GUARDS)


def _ast_xss(b: PyBlock) -> list[int]:
    lines = []
    for func in b.functions[1:]:
        taint = b.tainted(func)
        for n in ast.walk(func):
            if isinstance(n, ast.Return) and n.value is not None:
                value = n.value.args[0] if isinstance(n.value, ast.Call) and n.value.args and \
                    _dotted(n.value.func).rsplit(".", 1)[-1] in ("make_response", "Response", "HTMLResponse",
                                                                  "HttpResponse") else n.value
                html = any(isinstance(c, ast.Constant) and isinstance(c.value, str) and "<" in c.value
                           for c in ast.walk(value))
                if html and b.formatted(value) and b.carries(value, taint):
                    lines.append(n.lineno)
    return lines


def _ast_redirect(b: PyBlock) -> list[int]:
    return b.tainted_calls({"redirect", "RedirectResponse", "HttpResponseRedirect"},
                           {"url_has_allowed_host_and_scheme", "is_safe_url", "netloc", "urlparse", "url_for"})


def _ast_ssrf(b: PyBlock) -> list[int]:
    return b.tainted_calls(HTTP_CALLS, {"ALLOWED_HOSTS", "allowed_hosts", "netloc", "hostname"})


# request data in the languages without a syntax-tree layer: where it comes from, how a variable is assigned
# (group 1 the target, group 2 the value), parameters that carry it, what cleans it, and how a variable is written
_C_ASSIGN = r"(?:\b[\w<>\[\]]+\s+)?\b([A-Za-z_]\w*)\s*\+?=(?![=>])\s*([^;]*);"
TAINT = {
    "php": {"source": r"\$_(?:GET|POST|REQUEST|COOKIE|FILES)\b", "assign": r"\$(\w+)\s*\.?=(?![=>])\s*([^;]*);",
            "sanitizer": r"htmlspecialchars|htmlentities|intval|\(int\)|escapeshellarg|basename|json_decode|filter_var|"
                         r"realpath|in_array|preg_match", "var": r"\$(?:{})\b"},
    "javascript": {"source": r"\breq\.(?:query|params|body|cookies|headers)\b",
                   "assign": r"(?:\b(?:const|let|var)\s+)?(\{[^}]*\}|[A-Za-z_$][\w$]*)\s*\+?=(?![=>])\s*([^;\n]*)",
                   "sanitizer": r"\bescape\w*\(|encodeURIComponent|parseInt|Number\(|basename|sanitize|DOMPurify|"
                                r"validator\.|\.test\(", "var": r"(?<![\w$.])(?:{})\b"},
    "java": {"source": r"\.get(?:Parameter|Header|QueryString|Cookies)\s*\(", "assign": _C_ASSIGN,
             "params": r"@(?:RequestParam|PathVariable|RequestBody|RequestHeader)(?:\([^)]*\))?\s+(?:final\s+)?"
                       r"[\w<>\[\]]+\s+(\w+)",
             "sanitizer": r"Encode\.for|escapeHtml|parseInt|parseLong|getFileName\(\)|FilenameUtils\.getName|"
                          r"normalize\(", "var": r"(?<![\w.])(?:{})\b"},
    "csharp": {"source": r"\bRequest\.(?:Query|Form|Cookies|Headers)\b", "assign": _C_ASSIGN,
               "sanitizer": r"HtmlEncode|Path\.GetFileName|int\.Parse|Guid\.Parse", "var": r"(?<![\w.])(?:{})\b"},
    "rust": {"source": r"(?!)", "assign": r"\blet\s+(?:mut\s+)?(\w+)(?:\s*:\s*[^=;]+)?\s*=\s*([^;]*);",
             "params": r"\b(?:Path|Query|Json|Form)\s*\(\s*(?:mut\s+)?(\w+)\s*\)\s*:|"
                       r"\b(\w+)\s*:\s*web::(?:Path|Query|Json|Form)\s*<",
             "sanitizer": r"\.file_name\(\)|\.parse::<|sanitize", "var": r"(?<![\w.])(?:{})\b"},
}


def _quoted_sql(concat: str, then: str) -> str:
    """A string literal (either quote) holding SQL, joined by ``concat`` to more literals and then to ``then``."""
    return "|".join(rf"""(?i:{q}\s*{SQL_TEXT}[^{q}\n]*{q})(?:\s*{concat}\s*["'][^"'\n]*["'])*\s*{concat}\s*{then}"""
                    for q in ('"', "'"))


ALL = LANGUAGES
C_FAMILY = ("c", "cpp")

RULES: tuple[Rule, ...] = (
    # --- language-agnostic ---------------------------------------------------------------------------------
    Rule("any-private-key", ALL, "CWE-321", "warning",
         "A private key is embedded in the code; anyone who reads the code can impersonate its owner.",
         r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY(?: BLOCK)?-----",
         'KEY = """-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----"""',
         'KEY = open("/etc/app/server.key").read()  # -----BEGIN PUBLIC KEY----- is fine'),
    Rule("any-cloud-token", ALL, "CWE-798", "warning",
         "A cloud or service access token (AWS, GitHub, Slack, Google, Stripe, OpenAI) is written into the code.",
         r"\b(?:AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36}|xox[abposr]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}|"
         r"sk_live_[0-9A-Za-z]{24,}|sk-(?:proj-)?[A-Za-z0-9_-]{32,})\b",
         'client = boto3.client("s3", aws_access_key_id="AKIAZ7QH3KXVNPWE4T2M")',
         'client = boto3.client("s3")  # credentials from the environment or the instance role'),
    Rule("any-hardcoded-credential", ALL, "CWE-798", "warning",
         "A password, secret or API key is hard-coded; read it from the environment or a secret store instead. "
         "(Placeholders such as \"YOUR_API_KEY\" or \"<password>\" are not secrets and pass.)",
         r"""(?i)(?:password|passwd|pwd|secret(?:_?key)?|api_?key|apikey|access_?key|auth_?token|access_?token|"""
         r"""private_?key|client_?secret)(?![\w$])['"\]]?\s*(?::|=(?!=)|=>)\s*"""
         r"""@?["'](?![\s"'])(?![^"'\n]*(?:\$\{|\{\w*\}|%s|<[^>]*>|\*\*\*|\.\.\.|your|xxx|placeholder|example|"""
         r"""replace|insert|dummy|redacted|changeme|none["']|null["']))[^"'\n]{4,}["']""",
         'db = connect(host="db.internal", user="admin", password="Sup3rS3cret!")',
         'db = connect(host="db.internal", user="admin", password=os.environ["DB_PASSWORD"])'),
    Rule("any-world-writable", ("python", "c", "cpp", "php", "javascript", "rust"), "CWE-732", "warning",
         "A file is made writable by every user of the machine (mode 0777/0666 and the like).",
         r"""\bchmod(?:Sync)?\s*\([^;\n]*?,\s*['"]?(?:0o?)?[0-7]?[0-7]{2}[2367]['"]?\s*[,)]|"""
         r"""\bchmod\s*\([^;\n]*\bS_I(?:WOTH|RWXO)\b|\bfrom_mode\s*\(\s*0o[0-7]{2}[2367]\s*\)""",
         'os.chmod("/srv/app/uploads", 0o777)',
         'os.chmod("/srv/app/uploads", 0o750)'),
    # --- Python ------------------------------------------------------------------------------------------
    Rule("py-subprocess-shell", ("python",), "CWE-78", "error",
         "A command built at run time is run through the shell (shell=True): shell syntax in the input runs "
         "commands. Pass a list of arguments without shell=True.",
         r"\bshell\s*=\s*(?!False\b|0\b|None\b)\w",
         'subprocess.run(f"tar czf {name}.tgz {folder}", shell=True)',
         'subprocess.run(["tar", "czf", f"{name}.tgz", folder], check=True)', ast=_ast_shell),
    Rule("py-os-system", ("python",), "CWE-78", "error",
         "os.system/os.popen/getoutput run a string through the shell; a command built from input runs "
         "whatever the input says. Use subprocess.run with a list of arguments.",
         r"""\b(?:system|popen|getoutput|getstatusoutput)\s*\((?!\s*["'][^"'\n]*["']\s*\))""",
         'os.system("ping -c 1 " + host)',
         'os.system("clear")', ast=_ast_os_system),
    Rule("py-eval", ("python",), "CWE-95", "error",
         "eval/exec of a value that is not a constant runs arbitrary code; parse the input instead "
         "(ast.literal_eval, json.loads, a small parser).",
         r"(?<![\w.])(?:eval|exec)\s*\((?!\s*\))",
         'result = eval(request.args["expr"])',
         'result = ast.literal_eval(request.args["expr"])', ast=_ast_eval),
    Rule("py-deserialize-untrusted", ("python",), "CWE-502", "error",
         "Data from a web request or a socket is unpickled (pickle, dill, marshal, jsonpickle, ...): whoever sends "
         "it chooses code to run. Use json or another data-only format.",
         r"\b(?:pickle|dill|marshal|shelve|jsonpickle|joblib|read_pickle)\b",
         'state = pickle.loads(sock.recv(65536))',
         'state = json.loads(sock.recv(65536))', ast=_ast_deserialize_untrusted),
    Rule("py-unsafe-deserialization", ("python",), "CWE-502", "warning",
         "pickle-family loaders (pickle, dill, marshal, shelve, jsonpickle, joblib, torch.load with "
         "weights_only=False) run code chosen by whoever made the file; load only files you made, or use json, "
         "safetensors or torch.load(weights_only=True).",
         r"\b(?:pickle|dill|marshal|shelve|jsonpickle|joblib|read_pickle)\b|weights_only\s*=\s*False|"
         r"allow_pickle\s*=\s*True",
         'with open(path, "rb") as f:\n    model = pickle.load(f)',
         'with open(path, "rb") as f:\n    model = json.load(f)', ast=_ast_deserialize),
    Rule("py-yaml-load", ("python",), "CWE-502", "error",
         "yaml.load without a safe Loader (or yaml.unsafe_load) can build arbitrary Python objects from the "
         "document; use yaml.safe_load.",
         r"\byaml\.(?:unsafe_)?load(?:_all)?\s*\(|\bunsafe_load\s*\(",
         'config = yaml.load(open("config.yml"), Loader=yaml.Loader)',
         'config = yaml.safe_load(open("config.yml"))', ast=_ast_yaml),
    Rule("py-sql-injection", ("python",), "CWE-89", "error",
         "An SQL statement is built by string formatting and then executed: quotes in the values change the "
         "query. Use placeholders and pass the values separately.",
         r"\.(?:execute|executemany|executescript|raw|read_sql(?:_query)?)\s*\(|\btext\s*\(",
         'cur.execute(f"SELECT * FROM users WHERE name = \'{name}\'")',
         'cur.execute("SELECT * FROM users WHERE name = %s", (name,))', ast=_ast_sql),
    Rule("py-weak-hash", ("python",), "CWE-328", "warning",
         "MD5 and SHA-1 are broken for security uses (signatures, integrity against tampering, passwords); use "
         "SHA-256 or better, or pass usedforsecurity=False for a non-security checksum.",
         r"\b(?:md5|sha1|md4|MD5|SHA1|MD4)\b",
         'digest = hashlib.md5(token.encode()).hexdigest()',
         'digest = hashlib.sha256(token.encode()).hexdigest()', ast=_ast_weak_hash),
    Rule("py-fast-password-hash", ("python",), "CWE-916", "warning",
         "A password is hashed with a fast general-purpose hash; offline guessing is cheap. Use a password hash "
         "(hashlib.scrypt, pbkdf2_hmac with many iterations, bcrypt, argon2).",
         r"\b(?:sha224|sha256|sha384|sha512|blake2[bs]|sha3_\d+)\s*\(",
         'stored = hashlib.sha256(password.encode()).hexdigest()',
         'stored = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, 600_000).hex()',
         ast=_ast_fast_password_hash),
    Rule("py-insecure-random", ("python",), "CWE-338", "warning",
         "The random module is predictable; a token, password, salt or key made with it can be guessed. Use the "
         "secrets module.",
         r"\brandom\.(?:random|randint|randrange|choice|choices|sample|getrandbits|shuffle)\s*\(|"
         r"^\s*from\s+random\s+import\b",
         'token = "".join(random.choice(string.ascii_letters) for _ in range(32))',
         'token = secrets.token_urlsafe(32)', context=SECRET_CONTEXT),
    Rule("py-tls-unverified", ("python",), "CWE-295", "error",
         "TLS certificate checking is turned off, so anyone on the network path can read and change the traffic.",
         r"\bverify\s*=\s*False\b|\b_create_unverified_context\s*\(|\bCERT_NONE\b|"
         r"\bcheck_hostname\s*=\s*False\b|\bssl\s*=\s*False\b",
         'r = requests.get(url, verify=False, timeout=10)',
         'r = requests.get(url, verify="/etc/ssl/certs/internal-ca.pem", timeout=10)'),
    Rule("py-weak-tls-protocol", ("python",), "CWE-327", "warning",
         "SSLv2/SSLv3/TLS 1.0/TLS 1.1 are broken protocol versions; use ssl.create_default_context().",
         r"\bPROTOCOL_(?:SSLv2|SSLv3|SSLv23|TLSv1|TLSv1_1)\b|\bTLSVersion\.(?:SSLv3|TLSv1|TLSv1_1)\b",
         'ctx = ssl.SSLContext(ssl.PROTOCOL_TLSv1)',
         'ctx = ssl.create_default_context()'),
    Rule("py-weak-cipher", ("python",), "CWE-327", "warning",
         "DES, 3DES, RC4, Blowfish or ECB mode: broken or pattern-leaking encryption. Use AES-GCM or "
         "ChaCha20-Poly1305 (cryptography's AESGCM, Fernet).",
         r"\b(?:DES3?|ARC4|ARC2|Blowfish)\.new\s*\(|\bMODE_ECB\b|\balgorithms\.(?:TripleDES|Blowfish|ARC4|IDEA)\b|"
         r"\bmodes\.ECB\s*\(",
         'cipher = AES.new(key, AES.MODE_ECB)',
         'cipher = AES.new(key, AES.MODE_GCM)'),
    Rule("py-jwt-unverified", ("python",), "CWE-347", "error",
         "A JWT is decoded without checking its signature (or accepts the 'none' algorithm), so anyone can forge "
         "one.",
         r"""["']verify_signature["']\s*:\s*False|\bverify\s*=\s*False|algorithms\s*=\s*\[\s*["']none["']""",
         'claims = jwt.decode(token, options={"verify_signature": False})',
         'claims = jwt.decode(token, SECRET_KEY, algorithms=["HS256"])', requires=r"\bjwt\b"),
    Rule("py-flask-debug", ("python",), "CWE-489", "warning",
         "The Flask/Werkzeug debugger is on; it lets anyone who reaches the page run Python on the server.",
         r"\.run\s*\([^)\n]*\bdebug\s*=\s*True",
         'app.run(host="0.0.0.0", port=5000, debug=True)',
         'app.run(host="127.0.0.1", port=5000, debug=os.environ.get("FLASK_DEBUG") == "1")'),
    Rule("py-mktemp", ("python",), "CWE-377", "warning",
         "tempfile.mktemp returns a name another process can create first; use NamedTemporaryFile or mkstemp.",
         r"\bmktemp\s*\(",
         'path = tempfile.mktemp(suffix=".csv")',
         'fd, path = tempfile.mkstemp(suffix=".csv")'),
    Rule("py-tar-extract", ("python",), "CWE-22", "warning",
         "tarfile.extractall without a filter follows member names like ../../etc/cron.d/x out of the target "
         "directory; pass filter=\"data\".",
         r"\.extractall\s*\((?![^)]*\bfilter\s*=)",
         'with tarfile.open(upload) as tar:\n    tar.extractall("/srv/data")',
         'with tarfile.open(upload) as tar:\n    tar.extractall("/srv/data", filter="data")',
         requires=r"\btarfile\b"),
    Rule("py-template-injection", ("python",), "CWE-1336", "error",
         "render_template_string with a template built at run time: Jinja syntax in the input runs on the server. "
         "Keep the template constant and pass values as variables.",
         r"\brender_template_string\s*\(",
         'return render_template_string(f"<h1>Hello {name}</h1>")',
         'return render_template_string("<h1>Hello {{ name }}</h1>", name=name)', ast=_ast_template),
    Rule("py-path-traversal", ("python",), "CWE-22", "error",
         "A file path comes from the request without being confined to a directory; ../ in it reaches any file. "
         "Use secure_filename/send_from_directory or check the resolved path.",
         r"\brequest\b|@\w+\.(?:route|get|post)\b",
         '@app.route("/files")\ndef files():\n    return send_file(os.path.join("uploads", request.args["name"]))',
         '@app.route("/files")\ndef files():\n    return send_from_directory("uploads", request.args["name"])',
         ast=_ast_path_traversal),
    Rule("py-xss", ("python",), "CWE-79", "error",
         "HTML is built from request data without escaping it: a <script> in the input runs in the visitor's "
         "browser. Escape it (markupsafe.escape) or render a template.",
         r"\brequest\b|@\w+\.(?:route|get|post)\b",
         '@app.route("/hello")\ndef hello():\n    name = request.args.get("name", "")\n    return f"<p>Hi {name}</p>"',
         '@app.route("/hello")\ndef hello():\n    name = escape(request.args.get("name", ""))\n'
         '    return f"<p>Hi {name}</p>"', ast=_ast_xss),
    Rule("py-open-redirect", ("python",), "CWE-601", "warning",
         "A redirect goes to a URL taken from the request; an attacker's link can send users to any site. Only "
         "redirect to local paths or an allow-list.",
         r"\bredirect\s*\(|RedirectResponse\s*\(",
         '@app.route("/login")\ndef login():\n    return redirect(request.args.get("next"))',
         '@app.route("/login")\ndef login():\n    return redirect(url_for("index"))', ast=_ast_redirect),
    Rule("py-ssrf", ("python",), "CWE-918", "warning",
         "The server fetches a URL taken from the request; it can be pointed at internal services. Check the "
         "host against an allow-list.",
         r"\b(?:requests|httpx)\.(?:get|post|put|delete|head|request)\s*\(|\burlopen\s*\(",
         '@app.route("/preview")\ndef preview():\n    return requests.get(request.args["url"], timeout=5).text',
         '@app.route("/preview")\ndef preview():\n    return requests.get(PREVIEW_API, timeout=5).text',
         ast=_ast_ssrf),
    # --- C and C++ ---------------------------------------------------------------------------------------
    Rule("c-gets", C_FAMILY, "CWE-242", "error",
         "gets() cannot limit what it reads, so any long line overflows the buffer; use fgets.",
         r"(?<![\w.>])gets\s*\(",
         'char line[128];\ngets(line);',
         'char line[128];\nfgets(line, sizeof line, stdin);'),
    Rule("c-unbounded-scanf", C_FAMILY, "CWE-120", "error",
         "A %s or %[ conversion without a width reads any amount into a fixed buffer; give a width (%63s).",
         r"""\b[fs]?scanf(?:_s)?\s*\([^;]*?"(?:[^"\\\n]|\\.)*%(?:s|\[)""",
         'char name[64];\nscanf("%s", name);',
         'char name[64];\nscanf("%63s", name);'),
    Rule("c-strcpy", C_FAMILY, "CWE-120", "warning",
         "strcpy/strcat copy until the source ends, whatever the destination's size; use snprintf or a bounded "
         "copy that checks the length.",
         r"""\b(?:strcpy|strcat|wcscpy|wcscat|lstrcpy[AW]?|lstrcat[AW]?|_mbscpy|StrCpy|StrCat)\s*\(\s*[^,;]+,"""
         r"""\s*(?!"[^"\n]*"\s*\))""",
         'char dst[32];\nstrcpy(dst, argv[1]);',
         'char dst[32];\nsnprintf(dst, sizeof dst, "%s", argv[1]);'),
    Rule("c-sprintf", C_FAMILY, "CWE-120", "warning",
         "sprintf with a %s (or a format that is not a literal) writes past the buffer when the string is long; "
         "use snprintf with the buffer's size.",
         r"""\bv?sprintf\s*\(\s*[^,;]+,\s*(?:"(?:[^"\\\n]|\\.)*%-?\d*s|(?!")[A-Za-z_])""",
         'char msg[64];\nsprintf(msg, "hello %s", user);',
         'char msg[64];\nsnprintf(msg, sizeof msg, "hello %s", user);'),
    Rule("c-format-string", C_FAMILY, "CWE-134", "error",
         "A string that is not a literal is used as the format; %n and %x in it read and write memory. Use "
         "printf(\"%s\", s).",
         r"\b(?:printf|vprintf)\s*\(\s*[A-Za-z_][\w.\->\[\]]*(?:\.c_str\(\))?\s*\)|"
         r"\b(?:fprintf|dprintf|vfprintf|syslog)\s*\(\s*[\w.\->|]+\s*,\s*[A-Za-z_][\w.\->\[\]]*(?:\.c_str\(\))?\s*\)|"
         r"\bsnprintf\s*\([^,;]+,[^,;]+,\s*[A-Za-z_][\w.\->\[\]]*\s*\)",
         'fgets(buf, sizeof buf, stdin);\nprintf(buf);',
         'fgets(buf, sizeof buf, stdin);\nprintf("%s", buf);'),
    Rule("c-command-injection", C_FAMILY, "CWE-78", "error",
         "system()/popen() run a string built at run time through the shell; use execv/posix_spawn with an "
         "argument vector.",
         r"""(?<![\w.>])(?:system|popen|_popen|_wpopen)\s*\(\s*(?!"|NULL\b|0\s*\))|"""
         r"""\bexecl[p]?\s*\(\s*"[^"]*sh"\s*,\s*"[^"]*"\s*,\s*"-c"\s*,\s*(?!")""",
         'snprintf(cmd, sizeof cmd, "ping -c 1 %s", host);\nsystem(cmd);',
         'execlp("ping", "ping", "-c", "1", host, (char *)NULL);'),
    Rule("c-sql-injection", C_FAMILY, "CWE-89", "error",
         "An SQL statement is built with %s or string concatenation; quotes in the value change the query. Use "
         "prepared statements (sqlite3_bind_*, PQexecParams).",
         r"""\bs?n?printf\s*\([^;]*?"\s*(?i:""" + SQL_TEXT + r""")[^"\n]*%s|"""
         r"""(?i:"\s*""" + SQL_TEXT + r"""[^"\n]*")(?:\s*\+\s*"[^"\n]*")*\s*\+\s*[A-Za-z_]""",
         'snprintf(sql, sizeof sql, "SELECT * FROM users WHERE name = \'%s\'", name);\nsqlite3_exec(db, sql, 0, 0, 0);',
         'sqlite3_prepare_v2(db, "SELECT * FROM users WHERE name = ?", -1, &stmt, 0);\n'
         'sqlite3_bind_text(stmt, 1, name, -1, SQLITE_TRANSIENT);'),
    Rule("c-insecure-random", C_FAMILY, "CWE-338", "warning",
         "rand()/random()/mt19937 are predictable; keys, tokens and salts need a cryptographic generator "
         "(getrandom, RAND_bytes, BCryptGenRandom).",
         r"(?<![\w.>])(?:rand|random|drand48|lrand48)\s*\(|\b(?:mt19937(?:_64)?|default_random_engine|minstd_rand0?)\b",
         'for (int i = 0; i < 16; i++)\n    session_token[i] = charset[rand() % 62];',
         'if (getrandom(session_token, sizeof session_token, 0) < 0) abort();', context=SECRET_CONTEXT),
    Rule("c-weak-hash", C_FAMILY, "CWE-328", "warning",
         "MD2/MD4/MD5/SHA-1 are broken for security uses; use SHA-256 or better (EVP_sha256).",
         r"\b(?:MD[245]|SHA1?)_(?:Init|Update|Final)\s*\(|\b(?:MD[245]|SHA1)\s*\(|\bEVP_(?:md[245]|sha1)\s*\(",
         'MD5((unsigned char *)password, strlen(password), digest);',
         'SHA256((unsigned char *)data, len, digest);'),
    Rule("c-weak-cipher", C_FAMILY, "CWE-327", "warning",
         "DES, Blowfish, RC2/RC4, IDEA or ECB mode: broken or pattern-leaking encryption; use AES-GCM "
         "(EVP_aes_256_gcm) or ChaCha20-Poly1305.",
         r"\bEVP_(?:des|bf|rc[245]|cast5|idea)\w*\s*\(|\bEVP_aes_\d+_ecb\s*\(|"
         r"\b(?:DES_\w+|BF_set_key|RC4_set_key|RC4|AES_ecb_encrypt)\s*\(",
         'EVP_EncryptInit_ex(ctx, EVP_aes_128_ecb(), NULL, key, NULL);',
         'EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, iv);'),
    Rule("c-tls-no-verify", ("c", "cpp", "php"), "CWE-295", "error",
         "TLS peer verification is turned off, so anyone on the network path can impersonate the server.",
         r"\bSSL_CTX_set_verify\s*\([^,]+,\s*SSL_VERIFY_NONE\b|"
         r"\bCURLOPT_SSL_VERIFY(?:PEER|HOST)\s*,\s*(?:0L?|false|FALSE)\b",
         'curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, 0L);',
         'curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, 1L);'),
    Rule("c-insecure-tempfile", C_FAMILY, "CWE-377", "warning",
         "tmpnam/tempnam/mktemp return a name another process can create first; use mkstemp.",
         r"(?<![\w.>])(?:tmpnam|tempnam|mktemp|_mktemp)\s*\(",
         'char *path = tmpnam(NULL);\nFILE *f = fopen(path, "w");',
         'char path[] = "/tmp/upload-XXXXXX";\nint fd = mkstemp(path);'),
    Rule("c-small-rsa-key", C_FAMILY, "CWE-326", "warning",
         "An RSA key shorter than 2048 bits can be factored; use 2048 bits or more.",
         r"\bRSA_generate_key(?:_ex)?\s*\([^,;]*,\s*(?:256|512|768|1024)\b|"
         r"\bEVP_PKEY_CTX_set_rsa_keygen_bits\s*\([^,;]*,\s*(?:256|512|768|1024)\b",
         'EVP_PKEY_CTX_set_rsa_keygen_bits(ctx, 1024);',
         'EVP_PKEY_CTX_set_rsa_keygen_bits(ctx, 3072);'),
    # --- JavaScript / TypeScript -------------------------------------------------------------------------
    Rule("js-eval", ("javascript",), "CWE-95", "error",
         "eval/new Function/setTimeout with a string run code built at run time; parse the data (JSON.parse) or "
         "pass a function.",
         r"""(?<![\w$.])eval\s*\(\s*(?!["'][^"'\n]*["']\s*\))[^)\s]|\bnew\s+Function\s*\(|"""
         r"""\bset(?:Timeout|Interval)\s*\(\s*(?:["'`]|[\w$.]+\s*\+)""",
         'const result = eval(req.query.expression);',
         'const result = JSON.parse(req.query.payload);'),
    Rule("js-command-injection", ("javascript",), "CWE-78", "error",
         "child_process exec/execSync run a string through the shell; with input in it the input runs commands. "
         "Use execFile/spawn with an argument array.",
         r"""(?:(?<![\w$.])|(?<=child_process\.)|(?<=cp\.))exec(?:Sync)?\s*\(\s*(?!["'][^"'\n]*["']\s*[,)])|"""
         r"""\bspawn(?:Sync)?\s*\([^;]*\bshell\s*:\s*true""",
         "const { exec } = require('child_process');\nexec(`convert ${file} out.png`, cb);",
         "const { execFile } = require('child_process');\nexecFile('convert', [file, 'out.png'], cb);",
         requires=r"child_process"),
    Rule("js-sql-injection", ("javascript",), "CWE-89", "error",
         "An SQL statement is built by concatenation or a template literal; use placeholders (? or $1) and pass "
         "the values separately.",
         _quoted_sql(r"\+", r"[A-Za-z_$]") + r"""|(?i:`\s*""" + SQL_TEXT + r""")[^`]*\$\{""",
         "db.query(`SELECT * FROM users WHERE email = '${email}'`);",
         "db.query('SELECT * FROM users WHERE email = ?', [email]);"),
    Rule("js-xss-dom", ("javascript",), "CWE-79", "warning",
         "HTML built from data is written into the page (innerHTML, outerHTML, document.write, "
         "insertAdjacentHTML, dangerouslySetInnerHTML); use textContent or sanitise with DOMPurify.",
         r"""\.(?:inner|outer)HTML\s*\+?=\s*(?!\s*["'][^"'\n]*["']\s*;?\s*$)|\bdocument\.write(?:ln)?\s*\(\s*"""
         r"""(?!["'][^"'\n]*["']\s*\))|\.insertAdjacentHTML\s*\([^,]+,\s*(?!["'][^"'\n]*["']\s*\))|"""
         r"""dangerouslySetInnerHTML\s*=\s*\{\{\s*__html\s*:\s*(?!DOMPurify\.sanitize|sanitize)""",
         "el.innerHTML = `<b>${comment.author}</b>: ${comment.text}`;",
         "el.textContent = `${comment.author}: ${comment.text}`;"),
    Rule("js-reflected-xss", ("javascript",), "CWE-79", "error",
         "Request data is sent back inside an HTML response without escaping; a <script> in it runs in the "
         "visitor's browser.",
         r"\bres\.(?:send|write|end)\s*\(",
         "app.get('/hi', (req, res) => res.send(`<h1>Hi ${req.query.name}</h1>`));",
         "app.get('/hi', (req, res) => res.render('hi', { name: req.query.name }));",
         taint=r"""\bres\.(?:send|write|end)\s*\([^;]*(?:`(?=[^`]*<)[^`]*\$\{\s*{T}|"""
               r"""["'][^"'\n]*<[^"'\n]*["']\s*\+\s*{T})"""),
    Rule("js-path-traversal", ("javascript",), "CWE-22", "error",
         "A file path comes from the request; ../ in it reaches any file. Resolve it and check it stays inside "
         "the base directory.",
         r"\b(?:readFile|readFileSync|createReadStream|sendFile|download|unlink|unlinkSync|writeFile|"
         r"writeFileSync)\s*\(",
         "app.get('/f', (req, res) => res.sendFile(path.join(__dirname, 'files', req.query.name)));",
         "app.get('/f', (req, res) => res.sendFile(req.query.name, { root: path.join(__dirname, 'files') }));",
         unless=r"\.startsWith\s*\(|\bpath\.basename\s*\(|\broot\s*:",
         taint=r"\b(?:readFile|readFileSync|createReadStream|sendFile|download|unlink|unlinkSync|writeFile|"
               r"writeFileSync)\s*\([^;]*{T}"),
    Rule("js-open-redirect", ("javascript",), "CWE-601", "warning",
         "A redirect goes to a URL taken from the request; only redirect to local paths or an allow-list.",
         r"\bres\.redirect\s*\(",
         "app.get('/login/done', (req, res) => res.redirect(req.query.next));",
         "app.get('/login/done', (req, res) => res.redirect('/dashboard'));",
         taint=r"\bres\.redirect\s*\([^;)]*{T}"),
    Rule("js-prototype-pollution", ("javascript",), "CWE-1321", "warning",
         "A recursive merge/assign copies every key of an object, including __proto__ and constructor; a JSON "
         "body with them changes every object in the program. Skip those keys or use Object.create(null).",
         r"\bfor\s*\(\s*(?:const|let|var)\s+(\w+)\s+in\s+\w+\s*\)(?=[\s\S]{0,400}?\w+\[\1\]\s*=\s*\w*\(?[^;\n]*"
         r"\[\1\])",
         "function merge(a, b) {\n  for (const k in b) {\n"
         "    a[k] = typeof b[k] === 'object' ? merge(a[k] || {}, b[k]) : b[k];\n  }\n  return a;\n}",
         "function merge(a, b) {\n  for (const k of Object.keys(b)) {\n    if (k === '__proto__') continue;\n"
         "    a[k] = b[k];\n  }\n  return a;\n}",
         unless=r"__proto__|\bconstructor\b|hasOwnProperty|Object\.create\s*\(\s*null\s*\)"),
    Rule("js-insecure-random", ("javascript",), "CWE-338", "warning",
         "Math.random() is predictable; tokens, passwords and keys need crypto.randomBytes / "
         "crypto.getRandomValues / crypto.randomUUID.",
         r"\bMath\.random\s*\(",
         "const resetToken = Math.random().toString(36).slice(2);",
         "const resetToken = crypto.randomBytes(32).toString('hex');", context=SECRET_CONTEXT),
    Rule("js-tls-unverified", ("javascript",), "CWE-295", "error",
         "TLS certificate checking is turned off (rejectUnauthorized: false, NODE_TLS_REJECT_UNAUTHORIZED=0).",
         r"""\brejectUnauthorized\s*:\s*false\b|NODE_TLS_REJECT_UNAUTHORIZED\b[^;\n]*=\s*["']?0""",
         "const agent = new https.Agent({ rejectUnauthorized: false });",
         "const agent = new https.Agent({ ca: fs.readFileSync('ca.pem') });"),
    Rule("js-weak-hash", ("javascript",), "CWE-328", "warning",
         "MD5/SHA-1 are broken for security uses; use SHA-256 or, for passwords, scrypt/bcrypt/argon2.",
         r"""\bcreateH(?:ash|mac)\s*\(\s*["'](?:md5|md4|sha1|rsa-md5)["']""",
         "const hash = crypto.createHash('md5').update(password).digest('hex');",
         "const hash = crypto.createHash('sha256').update(fileBuffer).digest('hex');"),
    Rule("js-weak-cipher", ("javascript",), "CWE-327", "warning",
         "crypto.createCipher (no IV), DES, RC4, Blowfish or ECB mode; use createCipheriv with aes-256-gcm.",
         r"""\bcreateCipher\s*\(|\bcreateCipheriv\s*\(\s*["'](?:des|rc4|rc2|bf|blowfish|aes-\d+-ecb)""",
         "const cipher = crypto.createCipheriv('aes-256-ecb', key, null);",
         "const cipher = crypto.createCipheriv('aes-256-gcm', key, iv);"),
    Rule("js-jwt-hardcoded-secret", ("javascript",), "CWE-798", "warning",
         "A JWT is signed or verified with a secret written into the code; read it from the environment.",
         r"""\bjwt\.(?:sign|verify)\s*\([^,]+,\s*["'`][^"'`]+["'`]""",
         "const token = jwt.sign({ id: user.id }, 'my-secret', { expiresIn: '1h' });",
         "const token = jwt.sign({ id: user.id }, process.env.JWT_SECRET, { expiresIn: '1h' });"),
    # --- Java --------------------------------------------------------------------------------------------
    Rule("java-sql-injection", ("java",), "CWE-89", "error",
         "An SQL statement is built by concatenation or String.format; use a PreparedStatement with ? "
         "placeholders.",
         r"""(?i:"\s*""" + SQL_TEXT + r"""[^"\n]*")(?:\s*\+\s*"[^"\n]*")*\s*\+\s*[A-Za-z_]|"""
         r"""\bString\.format\s*\(\s*(?i:"\s*""" + SQL_TEXT + r""")""",
         'ResultSet rs = stmt.executeQuery("SELECT * FROM users WHERE name = \'" + name + "\'");',
         'PreparedStatement ps = conn.prepareStatement("SELECT * FROM users WHERE name = ?");\n'
         'ps.setString(1, name);'),
    Rule("java-command-injection", ("java",), "CWE-78", "error",
         "A command line is built from data and run (Runtime.exec with one string, or a shell with -c); pass a "
         "fixed program and separate arguments to ProcessBuilder.",
         r"""\.exec\s*\(\s*(?:"[^"\n]*"\s*\+|[a-z]\w*\s*\)|String\.format)|"""
         r"""\bProcessBuilder\s*\([^;]*"(?:/bin/)?(?:ba)?sh"\s*,\s*"-c"\s*,\s*(?!"[^"\n]*"\s*\))|"""
         r"""\bProcessBuilder\s*\([^;]*"cmd(?:\.exe)?"\s*,\s*"/c"\s*,\s*(?!"[^"\n]*"\s*\))""",
         'Process p = Runtime.getRuntime().exec("ping -c 1 " + host);',
         'Process p = new ProcessBuilder("ping", "-c", "1", host).start();'),
    Rule("java-weak-hash", ("java",), "CWE-328", "warning",
         "MD2/MD4/MD5/SHA-1 are broken for security uses; use SHA-256, or PBKDF2/bcrypt for passwords.",
         r"""\bMessageDigest\.getInstance\s*\(\s*"(?:MD2|MD4|MD5|SHA-?1|SHA)"\s*\)|\bDigestUtils\.(?:md5|sha1)""",
         'MessageDigest md = MessageDigest.getInstance("MD5");',
         'MessageDigest md = MessageDigest.getInstance("SHA-256");'),
    Rule("java-weak-cipher", ("java",), "CWE-327", "warning",
         "DES, 3DES, RC2/RC4, Blowfish, ECB mode, or bare \"AES\" (which means ECB); use AES/GCM/NoPadding.",
         r"""\bCipher\.getInstance\s*\(\s*"(?:DES|DESede|RC2|RC4|ARCFOUR|Blowfish|AES"|[^"]*/ECB/)""",
         'Cipher cipher = Cipher.getInstance("AES");',
         'Cipher cipher = Cipher.getInstance("AES/GCM/NoPadding");'),
    Rule("java-insecure-random", ("java",), "CWE-338", "warning",
         "java.util.Random and Math.random are predictable; use SecureRandom for tokens, passwords and keys.",
         r"\bnew\s+Random\s*\(|\bMath\.random\s*\(|\bThreadLocalRandom\.current\s*\(",
         'Random rnd = new Random();\nString token = Long.toHexString(rnd.nextLong());',
         'SecureRandom rnd = new SecureRandom();\nString token = Long.toHexString(rnd.nextLong());',
         context=SECRET_CONTEXT),
    Rule("java-deserialization", ("java",), "CWE-502", "warning",
         "ObjectInputStream.readObject builds any serialisable class the data names (gadget chains run code); "
         "use a data format such as JSON, or an ObjectInputFilter allow-list.",
         r"\bnew\s+ObjectInputStream\s*\(|\bXMLDecoder\s*\(",
         'ObjectInputStream in = new ObjectInputStream(socket.getInputStream());\nOrder o = (Order) in.readObject();',
         'Order o = new ObjectMapper().readValue(socket.getInputStream(), Order.class);',
         unless=r"\bsetObjectInputFilter\s*\("),
    Rule("java-xxe", ("java",), "CWE-611", "warning",
         "An XML parser is created with DTDs and external entities allowed; a document can read local files or "
         "make requests. Disallow doctype declarations.",
         r"\b(?:DocumentBuilderFactory|SAXParserFactory|XMLInputFactory|TransformerFactory|SAXReader|SAXBuilder)"
         r"\.?\w*\s*\(",
         'DocumentBuilderFactory dbf = DocumentBuilderFactory.newInstance();\nDocument doc = '
         'dbf.newDocumentBuilder().parse(input);',
         'DocumentBuilderFactory dbf = DocumentBuilderFactory.newInstance();\n'
         'dbf.setFeature("http://apache.org/xml/features/disallow-doctype-decl", true);',
         unless=r"disallow-doctype-decl|external-general-entities|ACCESS_EXTERNAL_DTD|SUPPORT_DTD|"
                r"IS_SUPPORTING_EXTERNAL_ENTITIES|FEATURE_SECURE_PROCESSING|setExpandEntityReferences\s*\(\s*false"),
    Rule("java-trust-all-certs", ("java",), "CWE-295", "error",
         "A TrustManager that accepts every certificate, or a HostnameVerifier that accepts every host, turns "
         "TLS checking off.",
         r"\bcheckServerTrusted\s*\([^)]*\)\s*(?:throws\s+[\w.,\s]+)?\{\s*\}|"
         r"\bverify\s*\(\s*String\s+\w+\s*,\s*SSLSession\s+\w+\s*\)\s*\{\s*return\s+true\s*;|"
         r"\bsetHostnameVerifier\s*\(\s*\(?[^)]*\)?\s*->\s*true|\bNoopHostnameVerifier\b|ALLOW_ALL_HOSTNAME_VERIFIER",
         'conn.setHostnameVerifier((hostname, session) -> true);',
         'conn.setHostnameVerifier(HttpsURLConnection.getDefaultHostnameVerifier());'),
    Rule("java-servlet-xss", ("java",), "CWE-79", "error",
         "A request parameter is written into the response unescaped; escape it (e.g. OWASP Encoder) or use a "
         "template that escapes.",
         r"\b(?:getWriter\s*\(\s*\)|writer|(?<!System\.)out)\.(?:print|println|write|append|printf)\s*\(",
         'response.getWriter().println("<p>Hello " + request.getParameter("name") + "</p>");',
         'response.getWriter().println("<p>Hello " + Encode.forHtml(request.getParameter("name")) + "</p>");',
         unless=r"\bEncode\.for|\bescapeHtml\d?\s*\(|\bHtmlUtils\.htmlEscape\s*\(",
         taint=r"\b(?:getWriter\s*\(\s*\)|writer|(?<!System\.)out)\.(?:print|println|write|append|printf)\s*\("
               r"[^;]*{T}"),
    Rule("java-path-traversal", ("java",), "CWE-22", "error",
         "A file path comes from the request; ../ in it reaches any file. Normalise it and check it stays in "
         "the base directory.",
         r"\b(?:new\s+File(?:InputStream|Reader)?|Paths\.get|Path\.of|resolve)\s*\(",
         'File f = new File(UPLOAD_DIR, request.getParameter("file"));',
         'File f = new File(UPLOAD_DIR, "report.pdf");',
         unless=r"\.normalize\s*\(\s*\)[^;]*;[\s\S]*\.startsWith\s*\(|\bgetCanonicalPath\s*\(",
         taint=r"\b(?:new\s+File(?:InputStream|Reader)?|Paths\.get|Path\.of|resolve)\s*\([^;]*{T}"),
    Rule("java-csrf-disabled", ("java",), "CWE-352", "warning",
         "Spring Security's CSRF protection is switched off; keep it on for browser-facing endpoints that use "
         "cookies.",
         r"\bcsrf\s*\(\s*\)\s*\.\s*disable\s*\(|\bcsrf\s*\(\s*(?:AbstractHttpConfigurer::disable|"
         r"\w+\s*->\s*\w+\.disable\s*\(\s*\))",
         'http.csrf(csrf -> csrf.disable()).authorizeHttpRequests(a -> a.anyRequest().authenticated());',
         'http.csrf(Customizer.withDefaults()).authorizeHttpRequests(a -> a.anyRequest().authenticated());'),
    Rule("java-hardcoded-db-password", ("java",), "CWE-798", "warning",
         "The database password is a literal in getConnection; read it from the environment or a vault.",
         r"""\bgetConnection\s*\([^;]*,\s*"[^"\n]*"\s*,\s*"[^"\n]+"\s*\)""",
         'Connection c = DriverManager.getConnection(url, "root", "toor123");',
         'Connection c = DriverManager.getConnection(url, "root", System.getenv("DB_PASSWORD"));'),
    # --- C# ----------------------------------------------------------------------------------------------
    Rule("cs-sql-injection", ("csharp",), "CWE-89", "error",
         "An SQL statement is built by concatenation, interpolation or string.Format; use SqlParameter "
         "(@name) or FromSqlInterpolated.",
         r"""(?i:"\s*""" + SQL_TEXT + r"""[^"\n]*")(?:\s*\+\s*"[^"\n]*")*\s*\+\s*[A-Za-z_]|"""
         r"""\$@?"\s*(?i:""" + SQL_TEXT + r""")[^"\n]*\{|\b(?:string\.Format|String\.Format)\s*\(\s*"""
         r"""(?i:"\s*""" + SQL_TEXT + r""")|\b(?:ExecuteSqlRaw|FromSqlRaw)\s*\(\s*\$""",
         'var cmd = new SqlCommand($"SELECT * FROM Users WHERE Name = \'{name}\'", conn);',
         'var cmd = new SqlCommand("SELECT * FROM Users WHERE Name = @name", conn);\n'
         'cmd.Parameters.AddWithValue("@name", name);'),
    Rule("cs-command-injection", ("csharp",), "CWE-78", "error",
         "A process is started with a command line built from data (often through cmd.exe /c); use "
         "ProcessStartInfo.ArgumentList with a fixed program.",
         r"""\b(?:Arguments\s*=|Process\.Start\s*\()[^;]*(?:"\s*\+\s*[A-Za-z_]|\$@?"[^"\n]*\{|\bstring\.Format)""",
         'Process.Start("cmd.exe", "/c ping " + host);',
         'var psi = new ProcessStartInfo("ping");\npsi.ArgumentList.Add(host);\nProcess.Start(psi);'),
    Rule("cs-weak-hash", ("csharp",), "CWE-328", "warning",
         "MD5/SHA-1 are broken for security uses; use SHA256, or Rfc2898DeriveBytes.Pbkdf2 for passwords.",
         r"\b(?:MD5|SHA1)\.Create\s*\(|\bnew\s+(?:MD5CryptoServiceProvider|SHA1CryptoServiceProvider|SHA1Managed)\b|"
         r"\b(?:MD5|SHA1)\.HashData\s*\(",
         'using var md5 = MD5.Create();\nvar hash = md5.ComputeHash(Encoding.UTF8.GetBytes(password));',
         'using var sha = SHA256.Create();\nvar hash = sha.ComputeHash(fileBytes);'),
    Rule("cs-weak-cipher", ("csharp",), "CWE-327", "warning",
         "DES, TripleDES, RC2 or ECB mode; use AesGcm.",
         r"\b(?:DES|TripleDES|RC2)\.Create\s*\(|\bnew\s+(?:DES|TripleDES|RC2)CryptoServiceProvider\b|"
         r"\bCipherMode\.ECB\b",
         'using var des = DES.Create();',
         'using var aes = new AesGcm(key, 16);'),
    Rule("cs-insecure-random", ("csharp",), "CWE-338", "warning",
         "System.Random is predictable; use RandomNumberGenerator for tokens, passwords and keys.",
         r"\bnew\s+Random\s*\(|\bRandom\.Shared\b",
         'var rng = new Random();\nvar resetToken = rng.Next(100000, 999999).ToString();',
         'var resetToken = RandomNumberGenerator.GetInt32(100000, 999999).ToString();',
         context=SECRET_CONTEXT),
    Rule("cs-unsafe-deserialization", ("csharp",), "CWE-502", "error",
         "BinaryFormatter-family serialisers, or Json.NET with TypeNameHandling, build any type the data names "
         "and can run code; use System.Text.Json with known types.",
         r"\b(?:BinaryFormatter|SoapFormatter|NetDataContractSerializer|LosFormatter|ObjectStateFormatter)\b|"
         r"\bTypeNameHandling\s*=\s*TypeNameHandling\.(?:All|Auto|Objects|Arrays)\b|\bSimpleTypeResolver\b",
         'var formatter = new BinaryFormatter();\nvar order = (Order)formatter.Deserialize(stream);',
         'var order = JsonSerializer.Deserialize<Order>(stream);'),
    Rule("cs-tls-unverified", ("csharp",), "CWE-295", "error",
         "A certificate validation callback accepts every certificate, turning TLS checking off.",
         r"\b(?:ServerCertificateValidationCallback|ServerCertificateCustomValidationCallback|"
         r"RemoteCertificateValidationCallback)\s*\+?=\s*[^;]*=>\s*true\b|DangerousAcceptAnyServerCertificateValidator",
         'handler.ServerCertificateCustomValidationCallback = (msg, cert, chain, errors) => true;',
         'handler.ServerCertificateCustomValidationCallback = (msg, cert, chain, errors) => '
         'errors == SslPolicyErrors.None;'),
    Rule("cs-xss-raw", ("csharp",), "CWE-79", "warning",
         "Html.Raw writes the value without HTML encoding; user text in it becomes script.",
         r"\bHtml\.Raw\s*\(\s*(?!\")",
         '<div>@Html.Raw(Model.Comment)</div>',
         '<div>@Model.Comment</div>'),
    Rule("cs-open-redirect", ("csharp",), "CWE-601", "warning",
         "A redirect goes to a URL from the request without Url.IsLocalUrl; use LocalRedirect or check it.",
         r"\bRedirect\s*\(\s*(?:returnUrl|redirectUrl|url|next|Request\.Query)",
         'return Redirect(returnUrl);',
         'return LocalRedirect(returnUrl);',
         unless=r"\bIsLocalUrl\s*\("),
    Rule("cs-xxe", ("csharp",), "CWE-611", "warning",
         "XML is parsed with DTD processing on or a resolver set, so external entities are loaded.",
         r"\bDtdProcessing\s*=\s*DtdProcessing\.Parse\b|\bXmlResolver\s*=\s*new\s+XmlUrlResolver\b|"
         r"\bProhibitDtd\s*=\s*false\b",
         'var settings = new XmlReaderSettings { DtdProcessing = DtdProcessing.Parse };',
         'var settings = new XmlReaderSettings { DtdProcessing = DtdProcessing.Prohibit };'),
    # --- PHP ---------------------------------------------------------------------------------------------
    Rule("php-command-injection", ("php",), "CWE-78", "error",
         "A shell command contains a variable that was not passed through escapeshellarg; input in it runs "
         "commands.",
         r"""(?<![\w>$:])(?:system|exec|shell_exec|passthru|popen|proc_open|pcntl_exec)\s*\((?![^;]*escapeshellarg)"""
         r"""[^;]*\$|`[^`\n]*\$\w+[^`\n]*`""",
         '$out = shell_exec("ping -c 1 " . $_GET["host"]);',
         '$out = shell_exec("ping -c 1 " . escapeshellarg($_GET["host"]));'),
    Rule("php-sql-injection", ("php",), "CWE-89", "error",
         "An SQL statement contains a variable (interpolated or concatenated); use PDO/mysqli prepared "
         "statements with placeholders.",
         r"""(?i:"\s*""" + SQL_TEXT + r""")[^"\n]*\$\w|""" + _quoted_sql(r"\.", r"\$"),
         '$result = mysqli_query($conn, "SELECT * FROM users WHERE id = $id");',
         '$stmt = $pdo->prepare("SELECT * FROM users WHERE id = ?");\n$stmt->execute([$id]);'),
    Rule("php-eval", ("php",), "CWE-95", "error",
         "eval/assert/create_function on a variable, or preg_replace with /e, run code built at run time.",
         r"""\b(?:eval|assert)\s*\([^;]*\$|\bcreate_function\s*\(|\bpreg_replace\s*\(\s*["'](.)[^"'\n]*\1[a-z]*e""",
         '$value = eval("return " . $_POST["formula"] . ";");',
         '$value = json_decode($_POST["formula"], true);'),
    Rule("php-unserialize", ("php",), "CWE-502", "error",
         "unserialize on data without allowed_classes instantiates any class (object injection); use "
         "json_decode or pass ['allowed_classes' => false].",
         r"\bunserialize\s*\((?![^;]*allowed_classes)",
         '$cart = unserialize($_COOKIE["cart"]);',
         '$cart = json_decode($_COOKIE["cart"], true);'),
    Rule("php-file-inclusion", ("php",), "CWE-98", "error",
         "include/require a path taken from the request: a remote or local file of the attacker's choice runs.",
         r"\b(?:include|require)(?:_once)?\b",
         'include($_GET["page"] . ".php");',
         '$pages = ["home" => "home.php"];\ninclude($pages[$page] ?? "home.php");',
         taint=r"""\b(?:include|require)(?:_once)?\b\s*\(?\s*(?:["'][^"'\n]*["']\s*\.\s*)?{T}"""),
    Rule("php-xss", ("php",), "CWE-79", "error",
         "Request data is echoed without htmlspecialchars; a <script> in it runs in the visitor's browser.",
         r"\b(?:echo|print)\b|<\?=",
         'echo "Hello, " . $_GET["name"];',
         'echo "Hello, " . htmlspecialchars($_GET["name"], ENT_QUOTES, "UTF-8");',
         taint=r"(?:\b(?:echo|print)\b|<\?=)(?!(?:(?!\?>)[^;])*(?:htmlspecialchars|htmlentities|strip_tags|intval|"
               r"json_encode))(?:(?!\?>)[^;])*(?:{T}|\$_SERVER\[\s*['\"]PHP_SELF)"),
    Rule("php-path-traversal", ("php",), "CWE-22", "error",
         "A file is opened by a path from the request; ../ in it reaches any file. Use basename() or check the "
         "realpath.",
         r"\b(?:file_get_contents|fopen|readfile|file|unlink|file_put_contents)\s*\(",
         'readfile("uploads/" . $_GET["file"]);',
         'readfile("uploads/" . basename($_GET["file"]));',
         taint=r"\b(?:file_get_contents|fopen|readfile|file|unlink|file_put_contents)\s*\((?![^;]*basename)[^;]*{T}"),
    Rule("php-weak-hash", ("php",), "CWE-328", "warning",
         "md5/sha1 are broken for security uses and far too fast for passwords; use password_hash, or "
         "hash('sha256', ...) for other digests.",
         r"(?<![\w>$:])(?:md5|sha1|md5_file|sha1_file)\s*\(|\bhash\s*\(\s*['\"](?:md5|sha1|md4)['\"]",
         '$hash = md5($password);',
         '$hash = password_hash($password, PASSWORD_DEFAULT);'),
    Rule("php-insecure-random", ("php",), "CWE-338", "warning",
         "rand/mt_rand/uniqid/lcg_value are predictable; use random_bytes or random_int for tokens and passwords.",
         r"(?<![\w>$:])(?:rand|mt_rand|uniqid|lcg_value|str_shuffle)\s*\(",
         '$token = md5(uniqid(mt_rand(), true));',
         '$token = bin2hex(random_bytes(32));', context=SECRET_CONTEXT),
    Rule("php-weak-cipher", ("php",), "CWE-327", "warning",
         "mcrypt is abandoned, and DES/RC4/Blowfish/ECB are broken or leak patterns; use openssl_encrypt with "
         "aes-256-gcm or sodium_crypto_secretbox.",
         r"\bmcrypt_\w+\s*\(|\bopenssl_(?:en|de)crypt\s*\([^,]+,\s*['\"](?:des|rc4|rc2|bf|blowfish|aes-\d+-ecb)",
         '$c = openssl_encrypt($data, "aes-128-ecb", $key);',
         '$c = openssl_encrypt($data, "aes-256-gcm", $key, 0, $iv, $tag);'),
    Rule("php-extract", ("php",), "CWE-621", "warning",
         "extract() on request data lets the request set any variable, including ones the code trusts.",
         r"\bextract\s*\(\s*\$_(?:GET|POST|REQUEST|COOKIE|FILES)\b",
         'extract($_POST);',
         '$name = $_POST["name"] ?? "";'),
    Rule("php-phpinfo", ("php",), "CWE-200", "warning",
         "phpinfo() shows configuration, paths and environment (sometimes secrets) to whoever loads the page.",
         r"\bphpinfo\s*\(",
         '<?php phpinfo(); ?>',
         '<?php echo PHP_VERSION; ?>'),
    # --- Rust --------------------------------------------------------------------------------------------
    Rule("rust-command-injection", ("rust",), "CWE-78", "error",
         "A shell (sh -c, cmd /C) is given a command built at run time; run the program directly with separate "
         ".arg() values.",
         r"""\bCommand::new\s*\(\s*"(?:/bin/|/usr/bin/)?(?:sh|bash|zsh|cmd|cmd\.exe|powershell)"\s*\)"""
         r"""[^;]*?"(?:-c|/C|/c|-Command)"[^;]*?(?:format!|\.arg\s*\(\s*&?[a-z_][\w.]*\s*\)|\+)""",
         'let out = Command::new("sh").arg("-c").arg(format!("ping -c 1 {}", host)).output()?;',
         'let out = Command::new("ping").args(["-c", "1", &host]).output()?;'),
    Rule("rust-sql-injection", ("rust",), "CWE-89", "error",
         "An SQL statement is built with format!; use the driver's placeholders and bind the values.",
         r"""\bformat!\s*\(\s*(?i:"\s*""" + SQL_TEXT + r""")[^"\n]*\{""",
         'let sql = format!("SELECT * FROM users WHERE name = \'{}\'", name);\nconn.execute(&sql, [])?;',
         'conn.execute("SELECT * FROM users WHERE name = ?1", params![name])?;'),
    Rule("rust-path-traversal", ("rust",), "CWE-22", "error",
         "A file path comes from a request parameter; ../ in it reaches any file. Keep only its file_name() or "
         "check the canonical path stays in the base directory.",
         r"\b(?:File::open|File::create|fs::read(?:_to_string)?|fs::write|fs::remove_file|NamedFile::open|"
         r"ServeFile::new)\s*\(",
         'async fn get(Path(name): Path<String>) -> Result<Vec<u8>, Error> {\n'
         '    Ok(tokio::fs::read(format!("files/{name}")).await?)\n}',
         'async fn get(Path(name): Path<String>) -> Result<Vec<u8>, Error> {\n'
         '    let name = std::path::Path::new(&name).file_name().ok_or(Error::BadName)?;\n'
         '    Ok(tokio::fs::read(std::path::Path::new("files").join(name)).await?)\n}',
         unless=r"\.canonicalize\s*\(\s*\)[\s\S]*\.starts_with\s*\(",
         taint=r"\b(?:File::open|File::create|fs::read(?:_to_string)?|fs::write|fs::remove_file|NamedFile::open|"
               r"ServeFile::new)\s*\([^;]*{T}"),
    Rule("rust-tls-unverified", ("rust",), "CWE-295", "error",
         "Certificate or hostname checking is turned off (danger_accept_invalid_*, SslVerifyMode::NONE, a "
         "verifier that accepts everything).",
         r"\bdanger_accept_invalid_(?:certs|hostnames)\s*\(\s*true\s*\)|\bSslVerifyMode::NONE\b|"
         r"\.dangerous\s*\(\s*\)\s*\.set_certificate_verifier\b",
         'let client = reqwest::Client::builder().danger_accept_invalid_certs(true).build()?;',
         'let client = reqwest::Client::builder().add_root_certificate(ca).build()?;'),
    Rule("rust-weak-hash", ("rust",), "CWE-328", "warning",
         "MD5/SHA-1 are broken for security uses; use sha2::Sha256, or argon2 for passwords.",
         r"\bMd5::(?:new|digest)\b|\bmd5::compute\s*\(|\bSha1::(?:new|digest|from)\b|"
         r"\bMessageDigest::(?:md5|sha1)\s*\(",
         'let digest = md5::compute(password.as_bytes());',
         'let digest = Sha256::digest(file_bytes);'),
    Rule("rust-weak-cipher", ("rust",), "CWE-327", "warning",
         "DES, RC4, Blowfish or ECB mode; use aes-gcm or chacha20poly1305.",
         r"\b(?:Des|TdesEde3|Rc4|Blowfish)::new\b|\becb::(?:En|De)cryptor\b|\bCipher::(?:des_\w+|rc4|bf_\w+|"
         r"aes_\d+_ecb)\s*\(",
         'let cipher = ecb::Encryptor::<Aes128>::new(&key.into());',
         'let cipher = Aes256Gcm::new(&key.into());'),
    Rule("rust-uninit-memory", ("rust",), "CWE-908", "warning",
         "Memory is used before it is initialised (mem::uninitialized, set_len on a fresh buffer); use "
         "MaybeUninit or initialise the buffer.",
         r"\bmem::uninitialized\s*(?:::<[^>]*>)?\s*\(|\.set_len\s*\(",
         'let mut buf: Vec<u8> = Vec::with_capacity(n);\nunsafe { buf.set_len(n); }',
         'let mut buf: Vec<u8> = vec![0; n];'),
    Rule("rust-insecure-random", ("rust",), "CWE-338", "warning",
         "A generator with a fixed seed, or a small non-cryptographic one, makes secrets that can be recomputed; "
         "use OsRng or rand::thread_rng().",
         r"\b(?:StdRng|SmallRng|ChaCha\d*Rng|Pcg\w*|XorShiftRng)::seed_from_u64\s*\(\s*\d+|"
         r"\bSmallRng::(?:from_entropy|from_rng|seed_from_u64)\b|\bfastrand::",
         'let mut rng = StdRng::seed_from_u64(42);\nlet session_key: [u8; 32] = rng.gen();',
         'let mut rng = OsRng;\nlet session_key: [u8; 32] = rng.gen();', context=SECRET_CONTEXT),
)

RULES_BY_LANGUAGE = {lang: tuple(r for r in RULES if lang in r.languages) for lang in LANGUAGES}
AGNOSTIC = tuple(r for r in RULES if r.languages == ALL)
_COMPILED = {r.id: re.compile(r.pattern, re.M) for r in RULES}
_EXTRA = {(r.id, k): re.compile(getattr(r, k), re.M) for r in RULES for k in ("requires", "unless", "context")
          if getattr(r, k)}
CONTEXT_LINES = (6, 3)  # lines before and after a hit searched for a rule's context words (within its paragraph)

# --- comments ----------------------------------------------------------------------------------------------

_STR_DQ = r'"(?:[^"\\\n]|\\.)*"'
_STR_SQ = r"'(?:[^'\\\n]|\\.)*'"
_CHAR = r"'(?:\\[^\n]{1,10}?|[^'\\\n])'"
_C_COMMENT = r"//[^\n]*|/\*[\s\S]*?\*/"
_LEXERS = {  # strings (kept) first, then comments (blanked); one pass per block
    "python": re.compile(r'(?P<s>"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|' + _STR_DQ + "|" + _STR_SQ + r")|(?P<c>#[^\n]*)"),
    "c": re.compile(f"(?P<s>{_STR_DQ}|{_CHAR})|(?P<c>{_C_COMMENT})"),
    "cpp": re.compile(f"(?P<s>{_STR_DQ}|{_CHAR})|(?P<c>{_C_COMMENT})"),
    "java": re.compile(f"(?P<s>{_STR_DQ}|{_CHAR})|(?P<c>{_C_COMMENT})"),
    "rust": re.compile(f"(?P<s>{_STR_DQ}|{_CHAR})|(?P<c>{_C_COMMENT})"),
    "csharp": re.compile(r'(?P<s>@"(?:""|[^"])*"|' + f"{_STR_DQ}|{_CHAR})|(?P<c>{_C_COMMENT})"),
    "javascript": re.compile(r"(?P<s>`(?:[^`\\]|\\.)*`|" + f"{_STR_DQ}|{_STR_SQ})|(?P<c>{_C_COMMENT})"),
    "php": re.compile(f"(?P<s>{_STR_DQ}|{_STR_SQ})|(?P<c>{_C_COMMENT}|#(?!\\[)[^\\n]*)"),
}


def strip_comments(code: str, language: str | None) -> str:
    """``code`` with the text of its comments replaced by spaces (newlines kept, so offsets and line numbers
    stay), strings untouched. Unknown language: C-style and ``#`` comments are both left in place."""
    lexer = _LEXERS.get(language)
    if lexer is None:
        return code
    return lexer.sub(lambda m: re.sub(r"[^\n]", " ", m.group()) if m.group("c") else m.group(), code)


# --- blocks and languages ----------------------------------------------------------------------------------

_FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*?)[ \t]*$")
OTHER_LANGUAGES = {"bash", "sh", "shell", "zsh", "console", "shell-session", "powershell", "ps1", "sql", "json",
                   "yaml", "yml", "toml", "ini", "xml", "html", "css", "text", "txt", "plaintext", "markdown", "md",
                   "go", "golang", "ruby", "rb", "kotlin", "kt", "swift", "scala", "perl", "lua", "r", "dockerfile",
                   "makefile", "diff", "csv", "graphql", "haskell", "elixir", "dart", "objective-c", "objc",
                   "output", "log", "env", "nginx", "hcl", "terraform"}


@dataclass
class Block:
    """A stretch of code: its text, the line of the whole input its first line is, and its language."""

    code: str
    first_line: int
    language: str | None  # one of LANGUAGES, another language's name (agnostic rules only), or None (unknown)
    fenced: bool
    how: str = ""  # how the language was chosen: "fence", "argument", "detected", "unknown"


def normalize_language(name: str) -> str:
    """The canonical name of a language we have rules for, from any alias (``py``, ``c++``, ``ts``, ``cs``);
    HerdError for anything else."""
    key = str(name).strip().lower()
    if key in ALIASES:
        return ALIASES[key]
    raise HerdError(f"language {name!r}: expected one of {', '.join(LANGUAGES)} (or an alias such as py, c++, js, "
                    f"ts, rs, cs)")


def _fence_language(info: str) -> str | None:
    """The language a fence's info string names: ``python``, ``{.python}``, ``py title="x"``, ``main.rs``."""
    word = info.strip().strip("{}").lstrip(".").split()[0].lower() if info.strip().strip("{}") else ""
    word = word.split(":")[0].split(",")[0]
    if word in ALIASES:
        return ALIASES[word]
    if "." in word and word.rsplit(".", 1)[1] in ALIASES:
        return ALIASES[word.rsplit(".", 1)[1]]
    return word or None


def split_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text (an unclosed fence runs to the end), or the whole text as one
    unfenced block when it has no fence."""
    lines = text.split("\n")
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, start = m.group("fence"), i + 1
        end = start
        while end < len(lines):
            close = _FENCE.match(lines[end])
            if close and close.group("fence")[0] == fence[0] and len(close.group("fence")) >= len(fence) \
                    and not close.group("info"):
                break
            end += 1
        blocks.append(Block("\n".join(lines[start:end]), start + 1, _fence_language(m.group("info")), True))
        i = end + 1
    if not blocks and text.strip():
        blocks.append(Block(text, 1, None, False))
    return blocks


# (pattern, weight) per language; a block is given the language with the largest sum of the signals it shows
_SIGNALS = {
    "python": [
        (r"^\s*def \w+\s*\(.*\)\s*(?:->\s*[^:]+)?:\s*$", 4), (r"^\s*(?:import [\w.]+|from [\w.]+ import )", 3),
        (r"^\s*class \w+(?:\(.*\))?:\s*$", 3), (r"\bself\.\w", 1), (r"^\s*(?:elif|except|with)\b.*:\s*$", 2),
        (r"\bNone\b", 1), (r"^\s*if .*:\s*$", 1), (r"\bprint\(", 1), (r"^\s*@\w+(?:\.\w+)*(?:\(.*\))?\s*$", 1)],
    "c": [
        (r"^\s*#\s*include\s*<(?:stdio|stdlib|string|unistd|stdint|stddef|stdbool|fcntl|time|errno|signal|ctype|"
         r"sys/\w+|netinet/\w+|arpa/\w+|openssl/\w+|curl/\w+|sqlite3)\.h>", 4),
        (r"\bprintf\s*\(", 1), (r"\b(?:malloc|calloc|free)\s*\(", 1), (r"\bint\s+main\s*\(", 1),
        (r"\bchar\s*\*?\s*\w+\s*\[", 1), (r"\bNULL\b", 1), (r"\bstruct\s+\w+\s*[{*]", 1), (r"->\w+", 0.5)],
    "cpp": [
        (r"#\s*include\s*<(?:iostream|string|vector|map|unordered_map|memory|algorithm|fstream|sstream|cstdio|"
         r"cstdlib|cstring|thread|mutex|random|chrono|array|optional)>", 5),
        (r"\bstd::", 4), (r"\b(?:cout|cin|cerr)\s*(?:<<|>>)", 3), (r"\busing namespace std\b", 3),
        (r"\btemplate\s*<", 2), (r"^\s*(?:public|private|protected):", 2), (r"\bnullptr\b|\bauto\s+\w+\s*=", 1)],
    "java": [
        (r"^\s*import\s+(?:java|javax|org|com)\.[\w.*]+;", 4), (r"^\s*package\s+[\w.]+;", 4),
        (r"\bSystem\.(?:out|err)\.print", 4), (r"\bpublic\s+static\s+void\s+main\s*\(\s*String", 4),
        (r"@(?:Override|Autowired|RestController|GetMapping|PostMapping|Service|Entity|Bean|Test)\b", 3),
        (r"\b(?:public|private|protected)\s+(?:static\s+)?(?:final\s+)?(?:class|interface)\s+\w+", 1),
        (r"\bString\s+\w+\s*[=;,)]", 1), (r"\bthrows\s+\w+", 2), (r"\bnew\s+\w+(?:<[^>]*>)?\s*\(", 0.5),
        (r"\b(?:public|private|protected)\s+(?:static\s+)?(?:final\s+)?[\w<>\[\]]+\s+[a-z]\w*\s*\(", 1.5)],
    "csharp": [
        (r"^\s*using\s+System(?:\.[\w.]+)?;", 5), (r"^\s*namespace\s+[\w.]+", 1),
        (r"\bConsole\.(?:WriteLine|ReadLine|Write)\b", 4), (r"\{\s*get;\s*(?:(?:private\s+|init;\s*)?set;\s*)?\}", 4),
        (r"\[(?:HttpGet|HttpPost|ApiController|Route|Authorize|Fact)\b", 4), (r"\bvar\s+\w+\s*=", 0.5),
        (r"\bstring\s+\w+\s*[=;,)]", 1), (r"\bConvert\.To\w+\s*\(", 2), (r"@(?:Model|Html)\.", 3),
        (r"\basync\s+Task\b|\bIActionResult\b|\bawait\s+\w+Async\b", 2),
        (r"\b(?:public|private|protected|internal)\s+(?:static\s+)?(?:async\s+)?[\w<>\[\]]+\s+[A-Z]\w*\s*\(", 1.5)],
    "javascript": [
        (r"\b(?:const|let)\s+[\w${}\s,]+=", 1.5), (r"\brequire\s*\(\s*['\"]", 3), (r"\bconsole\.log\s*\(", 3),
        (r"=>", 1), (r"\bfunction\b\s*\w*\s*\([^$)]*\)", 2), (r"\b(?:document|window)\.\w", 3),
        (r"\bmodule\.exports\b|^\s*export\s+(?:default|const|function)", 3), (r"^\s*import\s+.*\s+from\s+['\"]", 3),
        (r"\b(?:app|router)\.(?:get|post|use|listen)\s*\(", 2), (r"===|!==", 1),
        (r"\bres\.(?:send|json|status)\s*\(", 2)],
    "php": [
        (r"<\?php", 8), (r"\$\w+\s*=", 2), (r"\$_(?:GET|POST|REQUEST|SERVER|COOKIE|SESSION|FILES)\b", 4),
        (r"\becho\b", 1), (r"\bfunction\s+\w+\s*\(\s*\$", 2), (r"\$\w+->\w+", 2)],
    "rust": [
        (r"\bfn\s+\w+\s*(?:<[^>]*>)?\s*\(", 4), (r"\blet\s+mut\b", 4), (r"^\s*use\s+(?:std|crate|super|\w+)::", 3),
        (r"\b(?:println|format|vec|eprintln|panic|write)!\s*[(\[]", 3), (r"^\s*impl\b", 2),
        (r"->\s*(?:Result|Option|Self|String|bool|[iu](?:8|16|32|64|size))\b", 1),
        (r"&(?:mut\s+)?(?:self|str)\b", 2), (r"\b(?:Ok|Err|Some)\s*\(", 1), (r"\?;", 1)],
}
_SIGNALS_COMPILED = {lang: [(re.compile(p, re.M), w) for p, w in sigs] for lang, sigs in _SIGNALS.items()}


def detect_language(code: str) -> str | None:
    """The language ``code`` most looks like, from weighted signals (each counted once), or None when no language
    scores at least 2."""
    scores = {lang: sum(w for rx, w in sigs if rx.search(code)) for lang, sigs in _SIGNALS_COMPILED.items()}
    if scores["cpp"] >= 3:  # C++ uses C's headers and calls; its own signals settle it
        scores["cpp"] += scores["c"]
    best = max(scores, key=scores.get)
    return best if scores[best] >= 2 else None


# --- scanning ----------------------------------------------------------------------------------------------


def _line_starts(text: str) -> list[int]:
    return [0, *(m.end() for m in re.finditer("\n", text))]


def _rule_hits(rule: Rule, scan: BlockScan) -> list[int]:
    """Block-relative line numbers (from 1) where ``rule`` finds its pattern."""
    rx, stripped = _COMPILED[rule.id], scan.stripped
    first = rx.search(stripped)
    if first is None:
        return []
    if rule.requires and not _EXTRA[rule.id, "requires"].search(stripped):
        return []
    if rule.unless and _EXTRA[rule.id, "unless"].search(stripped):
        return []
    if rule.ast is not None and scan.python is not None:
        return sorted(set(rule.ast(scan.python)))
    if rule.taint is not None:
        rx, first = scan.taint_regex(rule), None
    at = "at" if "at" in rx.groupindex else 0  # a pattern may mark the spot to report with (?P<at>...)
    lines = sorted({scan.line_of(m.start(at)) for m in rx.finditer(stripped, first.start() if first else 0)})
    if rule.context:
        ctx, text_lines = _EXTRA[rule.id, "context"], stripped.split("\n")
        lines = [n for n in lines if ctx.search(_paragraph(text_lines, n - 1))]
    return lines


def _paragraph(lines: list[str], i: int) -> str:
    """The lines around line ``i`` (0-based) up to CONTEXT_LINES away, not crossing a blank line: the statement
    and the function head it belongs to, not the function before it."""
    before, after = CONTEXT_LINES
    lo = i
    while lo > max(0, i - before) and lines[lo - 1].strip():
        lo -= 1
    hi = i
    while hi < min(len(lines) - 1, i + after) and lines[hi + 1].strip():
        hi += 1
    return "\n".join(lines[lo:hi + 1])


def _parse_python(code: str) -> PyBlock | None:
    for candidate in (code, textwrap.dedent(code)):
        try:
            return PyBlock(ast.parse(candidate))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
    return None


class BlockScan:
    """What the rules share while scanning one block: the comment-free text, line starts, and (computed when a
    rule first needs them) the Python syntax tree and the variables holding request data."""

    def __init__(self, block: Block):
        self.language = block.language
        self.code = block.code
        self.stripped = strip_comments(block.code, block.language)
        self.starts = _line_starts(self.stripped)

    def line_of(self, offset: int) -> int:
        return bisect.bisect_right(self.starts, offset)

    @cached_property
    def python(self) -> PyBlock | None:
        return _parse_python(self.code) if self.language == "python" else None

    @cached_property
    def tainted(self) -> str:
        """A regex for request data in this block's language: a source expression, or a variable assigned one
        (followed through up to three assignments, stopping at a sanitiser)."""
        spec = TAINT.get(self.language)
        if spec is None:
            return r"(?!)"
        names = {next(g for g in m.groups() if g) for m in re.finditer(spec.get("params", "(?!)"), self.stripped)}
        assigns = [(m.group(1), m.group(2)) for m in re.finditer(spec["assign"], self.stripped)]
        source, clean = re.compile(spec["source"]), re.compile(spec["sanitizer"])
        for _ in range(3):
            for lhs, rhs in assigns:
                if not clean.search(rhs) and (source.search(rhs) or names & set(re.findall(r"[A-Za-z_]\w*", rhs))):
                    names.update(re.findall(r"[A-Za-z_]\w*", lhs))
        for lhs, rhs in assigns:  # `name = basename(name)`: the cleaned value replaces the raw one
            if clean.search(rhs) and lhs in names and re.search(rf"\b{re.escape(lhs)}\b", rhs):
                names.discard(lhs)
        if not names:
            return f"(?:{spec['source']})"
        variables = "|".join(sorted(re.escape(n) for n in names))
        return f"(?:{spec['source']}|{spec['var'].format(variables)})"

    def taint_regex(self, rule: Rule) -> re.Pattern:
        return re.compile(rule.taint.replace("{T}", self.tainted), re.M)


def scan_block(block: Block, rules: tuple[Rule, ...]) -> list[dict]:
    """The issues ``rules`` find in one block, with line numbers of the whole input."""
    scan = BlockScan(block)
    issues = []
    for rule in rules:
        for n in _rule_hits(rule, scan):
            issues.append({"rule": rule.id, "cwe": rule.cwe, "line": block.first_line + n - 1,
                           "severity": rule.severity, "description": rule.description,
                           "language": block.language if block.language in LANGUAGES else "any"})
    return issues


def _rules_for(language: str | None) -> tuple[Rule, ...]:
    if language in RULES_BY_LANGUAGE:
        return RULES_BY_LANGUAGE[language]
    if language is None:  # unknown: every language's rules, as Meta's Code Shield does without a language
        return RULES
    return AGNOSTIC  # a language we have no rules for (bash, sql, ...): secrets only


def _choose_language(block: Block, language: str | None) -> None:
    """A fence naming a language wins; then the caller's language; then a guess from the content. A fence
    naming a language we have no rules for keeps it (agnostic rules only)."""
    tag = block.language
    if tag in LANGUAGES or tag in OTHER_LANGUAGES:
        block.how = "fence"
    elif language is not None:
        block.language, block.how = language, "argument"
    else:
        block.language = detect_language(block.code) or tag
        block.how = "detected" if block.language in LANGUAGES else ("fence" if tag else "unknown")


def treatment(issues: list[dict]) -> str:
    """"block" for any error, "warn" for warnings only, "ignore" for none."""
    severities = {i["severity"] for i in issues}
    return next((TREATMENT[s] for s in SEVERITIES if s in severities), "ignore")


def scan_code(code: str, language: str | None = None) -> dict:
    """Scan a model's output (Markdown with fenced code, or plain code) for insecure code.

    ``language``: the code's language (see LANGUAGES; aliases such as ``py``, ``c++``, ``ts`` work) for blocks
    whose fence does not name one; None guesses it per block. Returns ``{"is_insecure", "issues": [{"rule",
    "cwe", "line", "severity", "description", "language"}], "recommended_treatment": "block" | "warn" |
    "ignore", "language", "scanned_blocks": [{"language", "first_line", "last_line", "fenced", "how"}]}``, issues
    ordered by line; ``language`` is the one language scanned, "mixed", or None when nothing was scanned.
    """
    if not isinstance(code, str):
        raise HerdError(f"code: expected a str of model output or source code, got {type(code).__name__}")
    wanted = normalize_language(language) if language is not None else None
    issues, blocks = [], split_blocks(code)
    for block in blocks:
        _choose_language(block, wanted)
        issues += scan_block(block, _rules_for(block.language))
    issues.sort(key=lambda i: (i["line"], i["rule"]))
    names = list(dict.fromkeys(b.language or "unknown" for b in blocks))
    return {
        "is_insecure": bool(issues),
        "issues": issues,
        "recommended_treatment": treatment(issues),
        "language": names[0] if len(names) == 1 else ("mixed" if names else None),
        "scanned_blocks": [{"language": b.language, "first_line": b.first_line,
                            "last_line": b.first_line + b.code.count("\n"), "fenced": b.fenced, "how": b.how}
                           for b in blocks],
    }


__all__ = ["LANGUAGES", "RULES", "Rule", "detect_language", "normalize_language", "scan_code", "split_blocks",
           "strip_comments", "treatment"]
