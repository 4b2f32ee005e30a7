"""Device side of the deploy protocol: offer/have-delta, windowed acks, resume from flash, whole-package check.

data_comm hands every DEPLOY_OFFER / DEPLOY_DATA / DEPLOY_COMMIT to Receiver.handle and sends back the replies.
Files under <root>/deploy/: key (provisioned), xfer.json (the transfer in progress and its acknowledged
offset), stream.part (the bytes received, at their stream offsets), stage.pkg (the package rebuilt from the
stream and the files already held), active.pkg (the last installed package, source of the held files).
"""

import hashlib
import json
import os
import struct

from firmware import messages as m
from firmware import package


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def _copy_range(src, start, n, out):
    src.seek(start)
    package.copy_range(src, n, out.write, "data while rebuilding the package")


class Receiver:
    """One device's package receiver; all state that must survive a restart lives in flash."""

    def __init__(self, root, agent):
        self.dir = root + "/deploy"
        self.agent = agent
        try:
            os.mkdir(self.dir)
        except OSError:
            pass
        self.state = None
        self.got = {}  # fragments received beyond the acknowledged offset (RAM only)
        try:
            with open(self.dir + "/xfer.json") as f:
                self.state = json.loads(f.read())
        except (OSError, ValueError):
            self.state = None
        self.acked = self.state["acked"] if self.state else 0

    def _path(self, name):
        return self.dir + "/" + name

    def _save_state(self):
        _write_atomic(self._path("xfer.json"), json.dumps(self.state).encode())

    def _clear(self):
        self.state = None
        self.got = {}
        self.acked = 0
        _remove(self._path("xfer.json"))
        _remove(self._path("stream.part"))

    def _held(self):
        """{sha8: (offset in active.pkg, size)} of the files in the last installed package."""
        held = {}
        try:
            with open(self._path("active.pkg"), "rb") as f:
                info = package.parse_header(f.read(1024))
        except (OSError, package.PackageError, ValueError):
            return held
        for e in info["files"]:
            held[e["sha8"]] = (info["head_size"] + e["offset"], e["size"])
        return held

    def _result(self, echo, status, reason):
        try:
            model_id, version = self.agent.champion_info()
        except Exception:
            model_id, version = "", 0
        mid = (model_id or "").encode()[:64]
        why = reason.encode()[:m.MAX_BODY - 8 - len(mid)]
        return [(m.DEPLOY_RESULT, struct.pack(m.RESULT_FORMAT, echo, status, version or 0)
                 + bytes([len(mid)]) + mid + why)]

    def handle(self, msg_type, body, seq=0):
        """Replies (list of (type, body)) to one deploy message."""
        try:
            if msg_type == m.DEPLOY_OFFER:
                return self._offer(body, seq)
            if msg_type == m.DEPLOY_DATA:
                return self._data(body, seq)
            if msg_type == m.DEPLOY_COMMIT:
                return self._commit(body, seq)
        except (ValueError, IndexError) as e:  # malformed body despite a good CRC
            return self._result(seq, m.RESULT_REFUSED, "malformed message: %s" % e)
        except OSError as e:  # flash full or failing: refuse, keep the champion, keep the loop alive
            self._clear()
            return self._result(seq, m.RESULT_REFUSED, "flash error: %s" % e)
        except Exception as e:  # never let a hostile message stop the device
            self._clear()
            return self._result(seq, m.RESULT_REFUSED, "refused: %s" % e)
        return []

    def _key(self):
        try:
            with open(self._path("key"), "rb") as f:
                return f.read()
        except OSError:
            return b""

    def _offer(self, body, seq):
        # authenticated before anything: a forged offer touches neither the transfer in progress nor the flash
        body = m.unseal(self._key(), m.TAG_OFFER, self.agent.device_id, body)
        if body is None:
            return self._result(seq, m.RESULT_REFUSED, "bad signature: unauthenticated offer")
        digest, size, version, n_files = struct.unpack_from(m.OFFER_FORMAT, body, 0)
        if size > package.MAX_PACKAGE:
            return self._result(seq, m.RESULT_REFUSED, "oversized package: %d bytes > %d" % (size, package.MAX_PACKAGE))
        if n_files > package.MAX_FILES:
            return self._result(seq, m.RESULT_REFUSED, "bad file count %d" % n_files)
        try:
            _, current = self.agent.champion_info()
        except Exception:
            current = 0
        if version <= (current or 0):
            return self._result(seq, m.RESULT_REFUSED,
                                "replayed or old package: version %d <= %d" % (version, current or 0))
        held = self._held()
        mask = 0
        files = []
        stream_size = size
        pos = struct.calcsize(m.OFFER_FORMAT)
        for i in range(n_files):
            sha8, fsize = struct.unpack_from(m.OFFER_FILE_FORMAT, body, pos)
            pos += struct.calcsize(m.OFFER_FILE_FORMAT)
            sha8 = bytes(sha8)
            src = held.get(sha8)
            if src is not None and src[1] == fsize:
                mask |= 1 << i
                stream_size -= fsize
                files.append([1, src[0], fsize])
            else:
                files.append([0, 0, fsize])
        if stream_size < 12 + package.TRAILER_SIZE or size - stream_size > size - 12 - package.TRAILER_SIZE:
            return self._result(seq, m.RESULT_REFUSED, "truncated package: %d bytes cannot hold its files" % size)
        hexd = bytes(digest).hex()
        st = self.state
        if st is None or st["digest"] != hexd or st["mask"] != mask or not _exists(self._path("stream.part")):
            self._clear()
            self.state = {"digest": hexd, "size": size, "stream": stream_size, "mask": mask,
                          "files": files, "acked": 0, "version": version}
            with open(self._path("stream.part"), "wb"):
                pass
            self._save_state()
        self.got = {}
        self.acked = self.state["acked"]
        return [(m.DEPLOY_HAVE, struct.pack(m.HAVE_FORMAT, seq, mask, stream_size, self.state["acked"]))]

    def _data(self, body, seq):
        st = self.state
        if st is None:
            return []  # not in a transfer (e.g. restarted before the offer): the gateway re-offers
        word = struct.unpack_from(m.DATA_FORMAT, body, 0)[0]
        offset = (word & (m.DATA_POLL - 1)) * m.DEPLOY_FRAG
        n = len(body) - 2
        acked = self.acked
        if n and offset >= acked and offset not in self.got \
                and (n == m.DEPLOY_FRAG and offset + n <= st["stream"] or offset + n == st["stream"]):
            with open(self._path("stream.part"), "r+b") as f:
                f.seek(offset)
                f.write(body[2:])
            self.got[offset] = n
            while acked in self.got:
                acked += self.got.pop(acked)
            self.acked = acked
        if not word & m.DATA_POLL:
            return []
        if acked != st["acked"]:
            st["acked"] = acked
            self._save_state()
        if acked == st["stream"]:
            return self._install(seq)  # the whole stream is here: the answer is the result, no commit round trip
        bits = 0
        for off in self.got:
            i = (off - acked) // m.DEPLOY_FRAG - 1
            if 0 <= i < m.ACK_BITS:
                bits |= 1 << i
        return [(m.DEPLOY_ACK, struct.pack(m.ACK_FORMAT, seq, acked, bits))]

    def _rebuild(self, name="stage.pkg"):
        """<name> from stream.part and the held files of active.pkg, checked against the offered sha256."""
        st = self.state
        stage = self._path(name)
        with open(self._path("stream.part"), "rb") as src, open(stage + ".tmp", "wb") as out:
            head = st["stream"] - package.TRAILER_SIZE - sum(f[2] for f in st["files"] if not f[0])
            if head <= 0:
                raise package.PackageError("truncated package: stream of %d bytes" % st["stream"])
            _copy_range(src, 0, head, out)
            pos = head
            active = open(self._path("active.pkg"), "rb") if st["mask"] else None
            try:
                for held, start, size in st["files"]:
                    if held:
                        _copy_range(active, start, size, out)
                    else:
                        _copy_range(src, pos, size, out)
                        pos += size
            finally:
                if active is not None:
                    active.close()
            _copy_range(src, pos, package.TRAILER_SIZE, out)
        with open(stage + ".tmp", "rb") as f:
            sha = hashlib.sha256()
            package.copy_range(f, st["size"] - package.TRAILER_SIZE, sha.update, "package after rebuild")
            trailer_sha = f.read(32)
        if sha.digest().hex() != st["digest"] or bytes(trailer_sha).hex() != st["digest"]:
            _remove(stage + ".tmp")
            raise package.PackageError("corrupted transfer: sha256 mismatch")
        os.rename(stage + ".tmp", stage)
        return stage

    def _commit(self, body, seq):
        digest = bytes(struct.unpack_from(m.COMMIT_FORMAT, body, 0)[0]).hex()
        st = self.state
        if st is None or st["digest"] != digest:
            if _exists(self._path("active.sha")):
                with open(self._path("active.sha")) as f:
                    if f.read() == digest:  # a repeated commit whose result was lost
                        return self._result(seq, m.RESULT_INSTALLED, "already installed")
            return self._result(seq, m.RESULT_REFUSED, "no transfer of that package in progress")
        return self._install(seq)

    def _install(self, seq):
        st = self.state
        if self.acked < st["stream"]:
            return self._result(seq, m.RESULT_REFUSED,
                                "incomplete: %d of %d bytes received" % (self.acked, st["stream"]))
        try:
            stage = self._rebuild()
        except (OSError, package.PackageError) as e:
            self._clear()
            return self._result(seq, m.RESULT_REFUSED, "cannot rebuild package: %s" % e)
        ok, reason = self.agent.install(stage)
        if not ok:
            self._clear()
            _remove(stage)
            return self._result(seq, m.RESULT_REFUSED, reason)
        # keep the installed package's stored files for the next delta (the agent may have removed stage.pkg)
        if _exists(stage):
            os.rename(stage, self._path("active.pkg"))
        else:
            try:
                os.rename(self._rebuild("active.new"), self._path("active.pkg"))
            except (OSError, package.PackageError):
                _remove(self._path("active.pkg"))
        _write_atomic(self._path("active.sha"), st["digest"].encode())
        self._clear()
        return self._result(seq, m.RESULT_INSTALLED, reason or "installed")
