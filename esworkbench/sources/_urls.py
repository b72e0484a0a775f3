"""Names of database sources: URLs as esworkbench shows and remembers them (never with a
password), and tables qualified by a schema."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["redact", "split_table"]


def redact(url: str) -> str:
    """The URL without its password (in the authority or as a ``password`` parameter).

    An import's checkpoint, its messages and its summary name the source by this text, so a
    password never reaches the store, and a changed password still names the same source.

    Examples:
        >>> redact("postgresql://app:s3cret@db.example:5432/ledger?password=x&sslmode=require")
        'postgresql://app@db.example:5432/ledger?sslmode=require'
        >>> redact("sqlite:///events.db")
        'sqlite:///events.db'
    """
    parts = urlsplit(url)
    if parts.password is None and "password" not in parts.query:
        return url
    netloc = parts.netloc
    if parts.password is not None:
        host = netloc.rpartition("@")[2]
        netloc = f"{parts.username}@{host}" if parts.username else host
    query = parts.query
    if "password" in query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, v) for k, v in pairs if k != "password"])
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def split_table(table: str | None) -> tuple[str | None, str | None]:
    """``"schema.name"`` -> (schema, name); a name without a dot has no schema, and
    ``"schema."`` names only the schema (where an eventsourcing application is looked for).

    Examples:
        >>> split_table("audit.events"), split_table("events"), split_table("audit.")
        (('audit', 'events'), (None, 'events'), ('audit', None))
    """
    if table is None or "." not in table:
        return None, table
    schema, _, name = table.partition(".")
    return schema, name or None
