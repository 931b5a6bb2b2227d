-- Which accounts a rating change touched (issue 18). Until now every change of rating data
-- moved rating_version and nothing else, so a catalog (rating/catalog.py) had to forget every
-- account it held; at a million accounts one plan change made each worker re-read them all.
-- Now the triggers on accounts and the group tables also log the accounts they changed, with
-- the version they bumped to, and a catalog that sees the version move from V0 to V drops
-- only the accounts logged with a version in (V0, V]. Price lists and plans keep their
-- statement-level bump (0003): a catalog reloads the lists whose own version moved and the
-- plans, and re-binds the accounts that use them.
--
-- Why a reader never misses a change (the ordering argument): rating_change_version() takes
-- its version with UPDATE rating_version ... RETURNING, which holds the row lock of the one
-- rating_version row from that statement to the end of the transaction. A second transaction
-- changing rating data waits on that lock until the first commits or rolls back (under READ
-- COMMITTED it then increments the committed value), so the transactions that change rating
-- data are serialized from their first change on and take their versions in the order they
-- commit: the transaction that logged version V committed after every transaction that
-- logged a version below V. So when a reader sees rating_version = V (committed), every change
-- logged with a version <= V is committed and visible to any later snapshot; a change not yet
-- visible gets a version above V and is read at the next check. (A sequence would not do: two
-- transactions could take 5 and 6 and commit 6 first; a reader seeing 6 would skip 5 for
-- ever.) A REPEATABLE READ or SERIALIZABLE transaction that changes rating data while another
-- does gets a serialization failure at the bump and must retry, as with 0003's bump.
--
-- A transaction bumps once: its first logged change takes a version, and its later changes
-- (other rows, other statements) are logged with the same one, read back from a setting local
-- to the transaction and keyed by its id. That keeps the argument (the lock is held from that
-- first bump to commit) and spares a statement changing 100,000 rows 100,000 updates of
-- rating_version. A 0003 statement-level bump later in the same transaction moves the version
-- again; its rows, logged with the lower one, are still committed with it.
--
-- Row triggers log only when a column the catalog reads changed (OLD vs NEW); INSERT and
-- DELETE on the group tables log the row's account. Inserted accounts are not logged (no
-- catalog holds them; one looked up before it existed is remembered as absent for a few
-- seconds only, as before). A manager's price list is inherited by its managed accounts that
-- have none of their own (rating/catalog.py's _SELECT), so a change of an account's
-- price_list_id logs those accounts too: the database knows who they are (accounts_manager),
-- where a catalog would have to keep every account's manager to know. They are read after
-- the bump, so a managed account changed by a transaction committed before it is seen, and
-- one changed by a transaction that commits after it is logged by that transaction.
--
-- Pruning: a catalog deletes the rows older than an hour (PostgreSQL's now(), compared with
-- changed_at) every few minutes and records, in rating_changes_pruned, the highest version it
-- deleted, in the same transaction as the delete. A catalog whose version is below it may
-- have lost changes and forgets every account (correct, only slow). It reads the version, the
-- pruned version and the changes in one snapshot, so a prune running meanwhile is either all
-- seen or not at all. The pruned version is a table of its own so that pruning never takes
-- rating_version's lock (it would wait on, and hold up, rating changes).

CREATE TABLE rating_changes (
    version    bigint      NOT NULL,
    account_id text        NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rating_changes_version ON rating_changes (version);

-- Changes up to this version may have been deleted. Nothing before this migration was logged:
-- a catalog holding an older version forgets everything once, as it used to on every change.
CREATE TABLE rating_changes_pruned (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    version bigint  NOT NULL
);
INSERT INTO rating_changes_pruned (version) SELECT version FROM rating_version;

-- The version this transaction's changes are logged with: bumped at its first change, the
-- same one after (see above).
CREATE FUNCTION rating_change_version() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    mine text := pg_current_xact_id()::text;
    got  text := coalesce(current_setting('meter.rating_change', true), '');
    v    bigint;
BEGIN
    IF split_part(got, ':', 1) = mine THEN
        RETURN split_part(got, ':', 2)::bigint;
    END IF;
    UPDATE rating_version SET version = version + 1 RETURNING version INTO v;
    PERFORM set_config('meter.rating_change', mine || ':' || v, true);
    RETURN v;
END $$;

-- An account's own price list, manager or plan changed: it, and the managed accounts that
-- inherit its price list when that changed.
CREATE FUNCTION accounts_rating_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v bigint := rating_change_version();  -- first: the read of managed accounts comes after
BEGIN
    INSERT INTO rating_changes (version, account_id) VALUES (v, NEW.id);
    IF OLD.id IS DISTINCT FROM NEW.id THEN
        INSERT INTO rating_changes (version, account_id) VALUES (v, OLD.id);
    END IF;
    IF OLD.price_list_id IS DISTINCT FROM NEW.price_list_id THEN
        INSERT INTO rating_changes (version, account_id)
            SELECT v, id FROM accounts WHERE manager_id = NEW.id AND price_list_id IS NULL;
    END IF;
    RETURN NULL;
END $$;

-- A row of billing_groups, outbound_profiles or number_groups came, went or moved: its
-- account (both, if it moved from one to another).
CREATE FUNCTION groups_rating_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v bigint := rating_change_version();
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO rating_changes (version, account_id) VALUES (v, OLD.account_id);
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.account_id IS DISTINCT FROM OLD.account_id)
    THEN
        INSERT INTO rating_changes (version, account_id) VALUES (v, NEW.account_id);
    END IF;
    RETURN NULL;
END $$;

DROP TRIGGER accounts_rating_version ON accounts;
DROP TRIGGER billing_groups_rating_version ON billing_groups;
DROP TRIGGER outbound_profiles_rating_version ON outbound_profiles;
DROP TRIGGER number_groups_rating_version ON number_groups;

CREATE TRIGGER accounts_rating_change AFTER UPDATE OF id, price_list_id, manager_id, plan_id
    ON accounts FOR EACH ROW
    WHEN ((OLD.id, OLD.price_list_id, OLD.manager_id, OLD.plan_id)
          IS DISTINCT FROM (NEW.id, NEW.price_list_id, NEW.manager_id, NEW.plan_id))
    EXECUTE FUNCTION accounts_rating_change();

-- A billing group's name is not rated: only its coming and going (and its keys) are.
CREATE TRIGGER billing_groups_rating_change AFTER INSERT OR DELETE
    ON billing_groups FOR EACH ROW EXECUTE FUNCTION groups_rating_change();
CREATE TRIGGER billing_groups_rating_change_update AFTER UPDATE OF account_id, id
    ON billing_groups FOR EACH ROW
    WHEN ((OLD.account_id, OLD.id) IS DISTINCT FROM (NEW.account_id, NEW.id))
    EXECUTE FUNCTION groups_rating_change();

-- The catalog reads only the profiles that have a group (and never their names).
CREATE TRIGGER outbound_profiles_rating_change_insert AFTER INSERT
    ON outbound_profiles FOR EACH ROW WHEN (NEW.billing_group_id IS NOT NULL)
    EXECUTE FUNCTION groups_rating_change();
CREATE TRIGGER outbound_profiles_rating_change_delete AFTER DELETE
    ON outbound_profiles FOR EACH ROW WHEN (OLD.billing_group_id IS NOT NULL)
    EXECUTE FUNCTION groups_rating_change();
CREATE TRIGGER outbound_profiles_rating_change_update
    AFTER UPDATE OF account_id, id, billing_group_id ON outbound_profiles FOR EACH ROW
    WHEN ((OLD.account_id, OLD.id, OLD.billing_group_id)
          IS DISTINCT FROM (NEW.account_id, NEW.id, NEW.billing_group_id))
    EXECUTE FUNCTION groups_rating_change();

CREATE TRIGGER number_groups_rating_change AFTER INSERT OR DELETE
    ON number_groups FOR EACH ROW EXECUTE FUNCTION groups_rating_change();
CREATE TRIGGER number_groups_rating_change_update
    AFTER UPDATE OF account_id, number, billing_group_id ON number_groups FOR EACH ROW
    WHEN ((OLD.account_id, OLD.number, OLD.billing_group_id)
          IS DISTINCT FROM (NEW.account_id, NEW.number, NEW.billing_group_id))
    EXECUTE FUNCTION groups_rating_change();
