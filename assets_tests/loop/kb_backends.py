"""Knowledge Bases in the state an older schema left them, and raw statements, on either backend."""

import sqlite3

import psycopg

from tinyml_dagster.knowledge_base import MIGRATIONS, _pg_ddl, is_url


def execute(location, *statements: str) -> None:
    """Run statements on the database itself (not through the manager), each committed."""
    if is_url(location):
        with psycopg.connect(location, autocommit=True) as conn:
            for stmt in statements:
                conn.execute(stmt)
    else:
        con = sqlite3.connect(location, isolation_level=None)
        for stmt in statements:
            con.execute(stmt)
        con.close()


def old_knowledge_base(location, version: int, *statements: str) -> None:
    """A Knowledge Base as schema `version` left it, then statements (its data) run on it."""
    ddl = [s for m in MIGRATIONS[:version] for s in m.split(";") if s.strip()]
    if is_url(location):
        execute(location, *map(_pg_ddl, ddl), "CREATE TABLE kb_schema (version BIGINT NOT NULL)",
                "INSERT INTO kb_schema VALUES (%d)" % version, *statements)
    else:
        execute(location, *ddl, "PRAGMA user_version=%d" % version, *statements)


def set_schema_version(location, version: int) -> None:
    execute(location, "UPDATE kb_schema SET version=%d" % version if is_url(location)
            else "PRAGMA user_version=%d" % version)


def fail_inserts_of_seq(location, seq: int) -> None:
    """A trigger that refuses (integrity error) any upload numbered seq."""
    if is_url(location):
        execute(location, "CREATE FUNCTION refuse_seq() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                " IF NEW.seq = %d THEN RAISE EXCEPTION 'no' USING ERRCODE = 'integrity_constraint_violation'; END IF;"
                " RETURN NEW; END $$" % seq,
                "CREATE TRIGGER refuse_seq BEFORE INSERT ON uploads FOR EACH ROW EXECUTE FUNCTION refuse_seq()")
    else:
        execute(location, "CREATE TRIGGER refuse_seq BEFORE INSERT ON uploads WHEN NEW.seq = %d"
                " BEGIN SELECT RAISE(ABORT, 'no'); END" % seq)


def drop_refusal(location) -> None:
    execute(location, "DROP TRIGGER refuse_seq" + (" ON uploads" if is_url(location) else ""))
