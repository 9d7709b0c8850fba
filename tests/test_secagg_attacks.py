"""An active server against secure aggregation (issue #13, item 5): each adversary is real code
that drives the clients' own step functions (fl.secagg.parties, with a real key store and
directory) and then does its best with what it got. Each attack is played twice: against the
clients as they are, where the round aborts or the clients refuse and the server's best
reconstruction is nowhere near the input; and, to show that the adversary works, against
clients with the defence switched off (a subclass that skips one check, which is what the
clients did before the consistency round and signed keys), where it recovers the input to
fixed-point precision.

(a) The split view of the review, against keys once per run: with 60 clients and a committee
    of 40, 24 share holders are told "nobody dropped", the target "those 24 dropped" and
    everyone else "the target dropped". Before the consistency check this recovered the
    target's input with an error of 3e-8 and no colluding client.
(b) The same split view against fresh keys every round, with the configured threshold and
    with a lowered one (which the split needs to have enough clients on each side).
(c) A server in the middle of the key agreement: what it forwards carries its own public keys
    in place of the target's, and in place of every peer's in the target's roster.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fedtune.fl import client as fl_client
from fedtune.fl.config import FLConfig, load_config
from fedtune.fl.data import ClientRef, registry
from fedtune.fl.exchange import Broadcast
from fedtune.fl.params import ModelParams
from fedtune.fl.secagg import bonawitz, run_keys, scalars
from fedtune.fl.secagg.bonawitz import AdvertisedKeys, SecAggClient, SecAggServer
from fedtune.fl.secagg.identity import PublicParameters, survivor_statement
from fedtune.fl.secagg.parties import (
    KeyStore,
    advertise_keys,
    consistency_check,
    make_keys,
    run_consistency,
    run_unmasking,
    share_keys,
    train_masked,
    train_run_masked,
    unmasking_shares,
)
from fedtune.fl.secagg.primitives import (
    SHAMIR_BYTES,
    WRAP,
    Ring,
    SecAggAbort,
    Segments,
    agree,
    hkdf,
    id_bytes,
    prg,
    rebuild_seeds,
    shamir_reconstruct,
    share_point,
)
from fedtune.fl.secagg.run_keys import PublicKey, Quorum, RunKeysClient, RunKeysServer
from fedtune.fl.statistics import combine_reports
from fedtune.fl.strategies import FedAvg

SESSION = "attacked-run"
ROUND = 1
PRECISION = 2.0**-24
"""A recovered input is the encoded one: within 2^-25 of the true value in every segment."""


# -- the clients' side of a run -----------------------------------------------------------------


@dataclass
class Deployment:
    """The clients of a run: their key store (with the run's directory), their references,
    the round's broadcast and codec."""

    config: FLConfig
    refs: list[ClientRef]
    store: KeyStore
    keys: dict[int, PublicKey | None]
    broadcast: Broadcast
    codec: Segments

    def quorum(self) -> Quorum:
        p = self.config.privacy
        return Quorum.of(len(self.refs), p.secagg_threshold, p.committee_size)

    def true_input(self, v: int) -> np.ndarray:
        """What client ``v`` masks this round, computed here independently of the protocol."""
        b = self.broadcast
        update = fl_client.train(self.refs[v], b.params, b.stats, self.config.client, ROUND)
        return scalars.with_scalars(
            b.contribution.vector(b.params, update), update, b.stats, self.codec
        )


def deploy(
    n: int, schedule: str, party: type[RunKeysClient] | None = None, extra: tuple[str, ...] = ()
) -> Deployment:
    """``n`` clients set up for a run: each publishes its identity in the run's directory and,
    with keys once per run, makes its key pair (``party``: a client class other than the real
    one, for the controls; ``extra``: more config overrides)."""
    overrides = [f"data.num_clients={n}", f"privacy.secagg_keys={schedule!r}", *extra]
    config = load_config(None, ["privacy.secure_aggregation=true", *overrides])
    refs = registry(config.data, config.experiment.seed)
    _, stats = combine_reports([fl_client.feature_moments(r, 1024) for r in refs])
    params = ModelParams.zeros(len(stats.mean))
    broadcast = Broadcast(params, stats, FedAvg().contribution(None))
    store = KeyStore()
    store.enroll(SESSION, PublicParameters.of(config))
    keys = {}
    for ref in refs:
        if party is None:
            keys[ref.index] = make_keys(store, ref, SESSION, schedule == "run")
        else:
            client = party(store.join(SESSION, ref), SESSION)
            store.put(SESSION, ref, client)
            keys[ref.index] = client.public_key()
    codec = scalars.round_codec(broadcast.contribution, params.num_features + 3, n)
    return Deployment(config, refs, store, keys, broadcast, codec)


def _pair_mask(u: int, v: int, mask: bytes, ring: Ring = WRAP) -> np.ndarray:
    """The mask ``u`` adds for ``v`` in a round, from the pair's mask of the round."""
    mask = np.frombuffer(mask, dtype=np.uint64)
    return mask if u < v else ring.neg(mask)


def _far(recovered: np.ndarray, x: np.ndarray) -> bool:
    """Not one value of ``x`` recovered, not even roughly."""
    return bool(np.min(np.abs(recovered - x)) > 1.0)


# -- keys once per run ----------------------------------------------------------------------------


class RunKeysRound:
    """The server's side of a keys-once-per-run round, honest or not: it forwards ``roster_for``
    each client, then plays :meth:`masked_inputs`, :meth:`views` and :meth:`unmask`. A training
    round by default; a subclass that overrides :meth:`mask` (with its own round number and
    codec) plays another round of the run, tests/test_secagg_statistics.py the statistics'."""

    round_num = ROUND

    def __init__(self, dep: Deployment, codec: Segments | None = None):
        self.dep = dep
        self.codec = dep.codec if codec is None else codec
        self.quorum = dep.quorum()
        self.cohort = sorted(dep.keys)
        r = self.round_num
        self.server = RunKeysServer(r, self.cohort, self.quorum, self.codec, self.codec.size)
        self.refusals: dict[int, str] = {}

    def roster_for(self, v: int) -> list[PublicKey]:
        return [self.dep.keys[u] for u in self.cohort]

    def mask(self, ref: ClientRef) -> run_keys.MaskedInput:
        """The client's masked input of the round, under the roster it is sent."""
        dep = self.dep
        return train_run_masked(
            dep.store, ref, SESSION, self.roster_for(ref.index), self.quorum, self.codec,
            dep.broadcast, dep.config.client, ROUND,
        ).masked  # fmt: skip

    def masked_inputs(self) -> dict[int, run_keys.MaskedInput]:
        inputs = {}
        for ref in self.dep.refs:
            try:
                inputs[ref.index] = self.mask(ref)
            except SecAggAbort as exc:
                self.refusals[ref.index] = str(exc)
        return inputs

    def unmask(self, inputs, views: dict[int, list[int]]) -> dict[int, run_keys.Unmasking]:
        """Each survivor signs the set it is sent; then each gets its set, every signature the
        server holds (the best it can do) and the shares its set calls for."""
        dep, signatures, answers, r = self.dep, {}, {}, self.round_num
        for v, view in views.items():
            try:
                signatures[v] = run_consistency(dep.store, dep.refs[v], SESSION, view, r)
            except SecAggAbort as exc:
                self.refusals[v] = str(exc)
        for v, view in views.items():
            holder = v in self.server.holders
            inbox = {u: inputs[u].shares[v] for u in view if u != v} if holder else {}
            try:
                answers[v] = run_unmasking(
                    dep.store, dep.refs[v], inbox, SESSION, view, signatures, r
                )
            except SecAggAbort as exc:
                self.refusals[v] = str(exc)
        return answers


def split_views(cohort: list[int], holders: list[int], target: int) -> dict[int, list[int]]:
    """The review's split: ``holders`` told that nobody dropped, the target that they all
    dropped, everyone else that the target dropped."""
    views = {v: [u for u in cohort if u != target] for v in cohort}
    views |= {v: list(cohort) for v in holders}
    views[target] = [u for u in cohort if u not in holders]
    return views


def reconstruct_run(round_: RunKeysRound, target: int, inputs, answers) -> np.ndarray:
    """The target's input as far as the server can unmask it: its self mask, if ``rebuild``
    holders sent shares of it, and every pairwise mask that someone revealed."""
    size, quorum, ring = round_.codec.size, round_.quorum, round_.codec.ring
    y = inputs[target].masked.copy()
    shares = [(v, a.self_mask_shares.get(target)) for v, a in answers.items()]
    shares = [(v, s) for v, s in shares if s is not None][: quorum.rebuild]
    if len(shares) == quorum.rebuild:
        limbs = np.array([[np.frombuffer(s, ">u4") for _, s in shares]], dtype=np.int64)
        (seed,) = rebuild_seeds(limbs, [share_point(v) for v, _ in shares])
        if seed is not None:
            y = ring.sub(y, prg(seed, size))
    own = answers[target].pair_masks if target in answers else {}
    for v in round_.cohort:
        mask = own.get(v) or (answers[v].pair_masks.get(target) if v in answers else None)
        if v != target and mask is not None:
            y = ring.sub(y, _pair_mask(target, v, mask, ring))
    return round_.codec.decode(y)


class TrustsAnySurvivorSet(RunKeysClient):
    """The control: a client that skips the consistency check (as before it existed)."""

    def _check_endorsements(self, *args) -> None:
        pass


@pytest.mark.parametrize("party", [None, TrustsAnySurvivorSet], ids=["clients", "control"])
def test_a_split_view_server_gets_nothing_with_keys_once_per_run(party):
    dep = deploy(60, "run", party)
    round_ = RunKeysRound(dep)
    assert round_.quorum == Quorum(survivors=36, holders=40, rebuild=24)
    inputs = round_.masked_inputs()
    round_.server.collect_masked_inputs({v: inputs[v] for v in inputs})
    target = next(v for v in round_.cohort if v not in round_.server.holders)
    holders = round_.server.holders[: round_.quorum.rebuild]
    answers = round_.unmask(inputs, split_views(round_.cohort, holders, target))
    x = dep.true_input(target)
    recovered = reconstruct_run(round_, target, inputs, answers)
    if party is TrustsAnySurvivorSet:  # the attack works on clients that trust their view
        assert np.max(np.abs(recovered - x)) <= PRECISION
        return
    # 24, 1 and 35 signatures on the three sets, each below t = 36: everybody refuses.
    assert answers == {}
    for v, why in round_.refusals.items():
        assert "signed it, below the threshold 36" in why, (v, why)
    assert len(round_.refusals) == 60
    assert _far(recovered, x)
    # Nor will the target ever sign the set the holders signed: one set a round.
    holders_set = survivor_statement(SESSION, ROUND, round_.cohort, round_.cohort)
    with pytest.raises(SecAggAbort, match="already answered for another survivor set"):
        dep.store.member(SESSION, dep.refs[target]).identity.endorse(ROUND, holders_set)


# -- fresh keys every round -----------------------------------------------------------------------


class SkipsChecks(SecAggClient):
    """The control: a per-round client that takes the server's threshold and survivor set on
    trust (as before the consistency check and the published threshold)."""

    def _check_threshold(self, roster_size: int) -> None:
        pass

    def _check_endorsements(self, *args) -> None:
        pass


class FreshKeysRound:
    """The server's side of a fresh-keys round, honest or not, up to the masked inputs; with
    ``threshold`` its own choice of t. ``party``: the clients' class (the real one by
    default). A training round, unless a subclass overrides :meth:`mask` (and the round number
    and codec)."""

    round_num = ROUND

    def __init__(
        self,
        dep: Deployment,
        threshold: int,
        party: type[SecAggClient] | None,
        codec: Segments | None = None,
    ):
        self.dep, self.threshold, self.party = dep, threshold, party
        self.codec = dep.codec if codec is None else codec
        self.session = "round-session"
        self.server = SecAggServer(threshold, self.codec, self.codec.size)
        self.refusals: dict[int, str] = {}

    def keys(self, ref: ClientRef) -> AdvertisedKeys:
        dep, r = self.dep, self.round_num
        if self.party is None:
            return advertise_keys(
                dep.store, ref, self.session, SESSION, self.threshold, self.codec, r
            )
        member = dep.store.member(SESSION, ref)
        client = self.party(member, self.session, r, self.threshold, self.codec)
        dep.store.put(self.session, ref, client)
        return client.advertise_keys()

    def roster_for(self, v: int, roster: list[AdvertisedKeys]) -> list[AdvertisedKeys]:
        return roster

    def mask(self, ref: ClientRef, inbox, roster: list[AdvertisedKeys]) -> np.ndarray:
        """The client's masked input of the round, under the roster it is sent."""
        dep = self.dep
        return train_masked(
            dep.store, ref, inbox, self.session, self.roster_for(ref.index, roster),
            dep.broadcast, dep.config.client, ROUND,
        ).masked  # fmt: skip

    def masked_inputs(self) -> tuple[list[AdvertisedKeys], dict, dict[int, np.ndarray]]:
        """Keys, shares and masked inputs; raises SecAggAbort where the honest server would."""
        dep, outboxes = self.dep, []
        roster = self.server.collect_keys([self.keys(ref) for ref in dep.refs])
        for ref in dep.refs:
            mine = self.roster_for(ref.index, roster)
            try:
                outboxes.append(share_keys(dep.store, ref, self.session, mine, self.round_num))
            except SecAggAbort as exc:
                self.refusals[ref.index] = str(exc)
        self.outboxes = outboxes
        inboxes = self.server.route_shares(outboxes)
        masked = {ref.index: self.mask(ref, inboxes[ref.index], roster) for ref in dep.refs}
        return roster, inboxes, masked

    def unmask(self, roster, inboxes, views: dict[int, list[int]]) -> dict:
        dep, signatures, answers, r = self.dep, {}, {}, self.round_num
        for step in ("sign", "unmask"):
            for v, view in views.items():
                ref, inbox = dep.refs[v], inboxes[v]
                try:
                    if step == "sign":
                        signatures[v] = consistency_check(
                            dep.store, ref, inbox, self.session, roster, view, r
                        )
                    else:
                        answers[v] = unmasking_shares(
                            dep.store, ref, inbox, self.session, roster, view, signatures, r
                        )
                except SecAggAbort as exc:
                    self.refusals[v] = str(exc)
        return answers


def reconstruct_round(target: int, masked, answers, roster, threshold: int, codec) -> np.ndarray:
    """The target's input as far as the server can unmask it: its self mask from t shares of
    its seed, its pairwise masks from t shares of its mask key."""
    size, ring = codec.size, codec.ring
    y = np.asarray(masked[target]).copy()
    for field in ("self_mask_shares", "mask_key_shares"):
        shares = {
            share_point(v): getattr(a, field)[target]
            for v, a in answers.items()
            if target in getattr(a, field)
        }
        if len(shares) < threshold:
            continue
        secret = shamir_reconstruct(shares, threshold).to_bytes(SHAMIR_BYTES, "big")[-32:]
        if field == "self_mask_shares":
            y = ring.sub(y, prg(secret, size))
            continue
        key = X25519PrivateKey.from_private_bytes(secret)
        for peer in roster:
            if peer.client_id != target:
                shared = agree(key, peer.mask_public)
                y = ring.sub(y, bonawitz._pair_mask(shared, target, peer.client_id, size, ring))
    return codec.decode(y)


@pytest.mark.parametrize(
    ("threshold", "party"),
    [(12, None), (6, None), (6, SkipsChecks)],
    ids=["configured-threshold", "lowered-threshold", "control"],
)
def test_a_split_view_server_gets_nothing_with_fresh_keys_every_round(threshold, party):
    dep = deploy(20, "round")
    round_ = FreshKeysRound(dep, threshold, party)
    if threshold < 12 and party is None:
        # t = 6 would let 6 clients rebuild the self mask and 13 others the mask key; every
        # client refuses it (the run publishes 60% of 20), and the round aborts at the shares.
        with pytest.raises(SecAggAbort, match="share keys: only 0 clients left"):
            round_.masked_inputs()
        assert len(round_.refusals) == 20
        assert all("below the published threshold 12" in w for w in round_.refusals.values())
        return
    roster, inboxes, masked = round_.masked_inputs()
    round_.server.collect_masked_inputs(masked)
    target, everyone = 0, list(range(20))
    told_nobody_dropped = everyone[1 : threshold + 1]
    answers = round_.unmask(roster, inboxes, split_views(everyone, told_nobody_dropped, target))
    x = dep.true_input(target)
    recovered = reconstruct_round(target, masked, answers, roster, threshold, dep.codec)
    if party is SkipsChecks:
        assert np.max(np.abs(recovered - x)) <= PRECISION
        return
    # The 12 told "nobody dropped" signed one set and unmask it (the sum of all 20, which the
    # server may learn); the 7 told "the target dropped" hold 7 signatures, the target 1.
    assert sorted(answers) == told_nobody_dropped
    assert all(not a.mask_key_shares for a in answers.values())
    for v in everyone[threshold + 1 :]:
        assert "only 7 member(s) of the survivor set of round 1 signed it" in round_.refusals[v]
    assert "8 survivors are fewer than the threshold 12" in round_.refusals[target]
    assert _far(recovered, x)


# -- a server in the middle of the key agreement --------------------------------------------------


class SkipsRunKeySignatures(RunKeysClient):
    """The control: a client that takes run keys on trust (as before they were signed)."""

    def _check_key(self, key: PublicKey) -> None:
        pass


class RunKeysInTheMiddle(RunKeysRound):
    """Forwards its own key for the target to everyone, and its own key for every peer to the
    target; the signatures it forwards are the real ones (it can make no others)."""

    def __init__(self, dep: Deployment, target: int):
        super().__init__(dep)
        self.target = target
        self.fake = {v: X25519PrivateKey.generate() for v in self.cohort}

    def _substitute(self, v: int) -> PublicKey:
        real = self.dep.keys[v]
        return PublicKey(v, self.fake[v].public_key().public_bytes_raw(), real.signature)

    def roster_for(self, v: int) -> list[PublicKey]:
        if v == self.target:
            return [self.dep.keys[u] if u == v else self._substitute(u) for u in self.cohort]
        return [self._substitute(u) if u == self.target else self.dep.keys[u] for u in self.cohort]

    def strip(self, inputs) -> np.ndarray:
        """The target's input from its masked input: every pair key it agreed was with the
        server, and so is every channel its self-mask shares travelled."""
        t, size = self.target, self.dep.codec.size
        mine = inputs[t]
        y = mine.masked.copy()
        channels = {}
        for v in self.cohort:
            if v == t:
                continue
            shared = self.fake[v].exchange(
                X25519PublicKey.from_public_bytes(self.dep.keys[t].public)
            )
            ids = id_bytes(min(t, v), max(t, v))
            pair_key = hkdf(shared, b"fedtune/secagg/run-pair-key" + ids)
            y -= _pair_mask(t, v, run_keys._pair_mask(pair_key, ROUND, size))
            channels[v] = AESGCM(hkdf(shared, b"fedtune/secagg/run-channel-key" + ids))
        holders = [h for h in mine.shares][: self.quorum.rebuild]
        limbs = [
            np.frombuffer(
                channels[h].decrypt(
                    run_keys._nonce(ROUND, t, h), mine.shares[h], run_keys._IDS.pack(ROUND, t, h)
                ),
                ">u4",
            )
            for h in holders
        ]
        (seed,) = rebuild_seeds(
            np.array([limbs], dtype=np.int64), [share_point(h) for h in holders]
        )
        return self.dep.codec.decode(y - prg(seed, size))


@pytest.mark.parametrize("party", [None, SkipsRunKeySignatures], ids=["clients", "control"])
def test_a_server_in_the_middle_of_the_run_keys_gets_nothing(party):
    dep = deploy(10, "run", party)
    target = 3
    round_ = RunKeysInTheMiddle(dep, target)
    inputs = round_.masked_inputs()
    if party is SkipsRunKeySignatures:
        x = dep.true_input(target)
        assert np.max(np.abs(round_.strip(inputs) - x)) <= PRECISION
        return
    # Nobody masks under a key it cannot verify: no masked input, so no pair mask derived from
    # the server's keys reaches it, and the round aborts.
    assert inputs == {} and len(round_.refusals) == 10
    assert all("no valid signature of client" in why for why in round_.refusals.values())
    assert "no valid signature of client 3 on its run key" in round_.refusals[0]
    with pytest.raises(SecAggAbort, match="masked input: only 0 clients left"):
        round_.server.collect_masked_inputs(inputs)


class SkipsRoundKeySignatures(SecAggClient):
    """The control: a per-round client that takes advertised keys on trust."""

    def _check_keys(self, roster) -> None:
        pass


class FreshKeysInTheMiddle(FreshKeysRound):
    """Forwards its own keys for the target to everyone, and its own keys for every peer to
    the target, with the real signatures."""

    def __init__(self, dep: Deployment, threshold: int, party, target: int):
        super().__init__(dep, threshold, party)
        self.target = target
        self.fake = {
            v: (X25519PrivateKey.generate(), X25519PrivateKey.generate())
            for v in range(len(dep.refs))
        }

    def _substitute(self, k: AdvertisedKeys) -> AdvertisedKeys:
        channel, mask = (key.public_key().public_bytes_raw() for key in self.fake[k.client_id])
        return AdvertisedKeys(k.client_id, channel, mask, k.signature)

    def roster_for(self, v: int, roster: list[AdvertisedKeys]) -> list[AdvertisedKeys]:
        if v == self.target:
            return [k if k.client_id == v else self._substitute(k) for k in roster]
        return [self._substitute(k) if k.client_id == self.target else k for k in roster]

    def strip(self, roster, masked) -> np.ndarray:
        """The target's input: its outgoing shares travelled on channels agreed with the
        server, so t of them rebuild its self-mask seed; its pairwise masks are the server's."""
        t, size = self.target, self.dep.codec.size
        mine = next(k for k in roster if k.client_id == t)
        out = next(box for box in self.outboxes if box and box[0].sender == t)
        shares = {}
        for share in out[: self.threshold]:
            channel = agree(self.fake[share.recipient][0], mine.channel_public)
            aead = bonawitz._channel(channel, t, share.recipient)
            plain = aead.decrypt(bonawitz._NONCE, share.ciphertext, id_bytes(t, share.recipient))
            shares[share_point(share.recipient)] = int.from_bytes(plain[:SHAMIR_BYTES], "big")
        seed = shamir_reconstruct(shares, self.threshold).to_bytes(SHAMIR_BYTES, "big")[-32:]
        y = np.asarray(masked[t]) - prg(seed, size)
        for v in range(len(self.dep.refs)):
            if v != t:
                shared = agree(self.fake[v][1], mine.mask_public)
                y -= bonawitz._pair_mask(shared, t, v, size, WRAP)
        return self.dep.codec.decode(y)


@pytest.mark.parametrize("party", [None, SkipsRoundKeySignatures], ids=["clients", "control"])
def test_a_server_in_the_middle_of_the_round_keys_gets_nothing(party):
    dep = deploy(10, "round")
    target = 3
    round_ = FreshKeysInTheMiddle(dep, 6, party, target)
    if party is SkipsRoundKeySignatures:
        roster, _, masked = round_.masked_inputs()
        x = dep.true_input(target)
        assert np.max(np.abs(round_.strip(roster, masked) - x)) <= PRECISION
        return
    # Nobody shares keys with, or masks under, a key it cannot verify: the round aborts before
    # any share or masked input exists.
    with pytest.raises(SecAggAbort, match="share keys: only 0 clients left"):
        round_.masked_inputs()
    assert round_.outboxes == [] and len(round_.refusals) == 10
    assert all("no valid signature of client" in why for why in round_.refusals.values())
    assert "no valid signature of client 3 on its round keys" in round_.refusals[0]


def test_a_server_that_shrinks_the_cohort_cannot_lower_t():
    # Under DP the sample is secret, so a client cannot check the roster it is sent against it.
    # The server tells the target its cohort is {target, accomplice}: with t taken of that
    # cohort alone (2), one colluding client would unmask the target. The clients take t of at
    # least the public cohort floor: 60 clients at q = 0.5 give 30 expected, floor
    # 30 - 5.5 sqrt(15) = 8, so t >= ceil(0.6 * 8) = 5 whatever the roster.
    dp = ("privacy.noise_multiplier=1.0", "rounds.fraction=0.5")
    dep = deploy(60, "run", extra=dp)
    assert PublicParameters.of(dep.config).min_cohort == 8
    target, accomplice = dep.refs[0], dep.refs[1]
    roster = [dep.keys[target.index], dep.keys[accomplice.index]]
    tiny = Quorum.of(2, 0.6, dep.config.privacy.committee_size)  # what the server claims
    assert tiny.survivors == 2
    with pytest.raises(SecAggAbort, match="not the published"):
        train_run_masked(
            dep.store, target, SESSION, roster, tiny, dep.codec, dep.broadcast,
            dep.config.client, ROUND,
        )  # fmt: skip
    # Sent the floor's quorum instead, the target masks, but no set of two can ever gather the
    # 5 signatures unmasking needs: the target refuses to sign a set below t.
    honest = Quorum.of(2, 0.6, dep.config.privacy.committee_size, 8)
    assert honest.survivors == 5
    train_run_masked(
        dep.store, target, SESSION, roster, honest, dep.codec, dep.broadcast,
        dep.config.client, ROUND,
    )  # fmt: skip
    with pytest.raises(SecAggAbort):
        run_consistency(dep.store, target, SESSION, [target.index, accomplice.index], ROUND)
