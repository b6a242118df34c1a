// Package scrub keeps configured secrets (the upstream key, client keys,
// passwords) out of every byte the proxy passes on or stores.
//
// A Masker replaces each occurrence of any of its secrets with a mask of
// the same length, so a Content-Length stays true:
//
//	m := scrub.New(cfg.Secrets()...)     // once, at start-up; safe for concurrent use
//	v = m.Bytes(v)                       // a header value, a stored body
//	s = m.String(s)                      // a log text, a stored field
//	body = m.Reader(upstreamBody)        // a streamed body, one Reader per response
//
// Every byte covered by an occurrence of any secret becomes '*'; nothing of
// the secret is kept. Bytes and String return their input unchanged (no
// copy) when it holds no secret. A Reader gives, over any split of its input
// into reads, exactly what Bytes gives for the whole: it holds back only the
// longest tail of a read that could still start a secret, and releases it as
// soon as it cannot (or at the end of the input), so an SSE event ending in
// "\n\n" leaves in the same Read that brought it.
//
// Decode undoes a response's Content-Encoding (gzip, deflate, br, zstd,
// several in one header) into a bounded identity stream, so a compressed
// body can be scrubbed too: serve it decoded, without Content-Encoding and
// Content-Length.
//
// The mask byte is '*': a secret that contains '*' can be rebuilt from a
// mask next to it, so secrets should not contain it (API keys do not).
package scrub

import (
	"bytes"
	"encoding/binary"
	"unsafe"
)

// maskByte replaces every byte of a secret.
const maskByte = '*'

// fewSecrets is how many secrets are still searched one bytes.Index pass
// each; above it one pass with a hashed prefix filter is faster
// (BenchmarkMasker*, see the package tests).
const fewSecrets = 4

// filterBits is log2 of the prefix filter's size in bits (8 KiB): with a few
// hundred secrets almost every position fails it on one bit test.
const filterBits = 16

// Masker masks a fixed set of secrets. It is immutable after New and safe
// for concurrent use. A nil *Masker masks nothing.
type Masker struct {
	secrets [][]byte
	maxLen  int
	indexed bool // search with the prefix filter rather than one pass per secret

	// Every secret is indexed by its first q bytes (q = min(shortest, 8)),
	// read as one little-endian uint64.
	q      int
	qmask  uint64
	byKey  map[uint64][]int32  // first q bytes → secrets starting so
	short  map[uint64]struct{} // prefixes shorter than q, tagged with their length
	first  [256]bool           // bytes a secret starts with
	filter [1 << filterBits / 64]uint64
}

// span is the half-open range [s, e) of one or more overlapping occurrences.
type span struct{ s, e int }

// New returns a Masker for the given secrets. Empty and repeated secrets are
// ignored.
func New(secrets ...string) *Masker {
	m := &Masker{byKey: map[uint64][]int32{}, short: map[uint64]struct{}{}}
	seen := map[string]bool{}
	for _, s := range secrets {
		if s == "" || seen[s] {
			continue
		}
		seen[s] = true
		m.secrets = append(m.secrets, []byte(s))
		m.maxLen = max(m.maxLen, len(s))
		if m.q == 0 || len(s) < m.q {
			m.q = len(s)
		}
	}
	m.indexed = len(m.secrets) > fewSecrets
	m.q = min(m.q, 8)
	m.qmask = ^uint64(0) >> (64 - 8*m.q)
	for i, s := range m.secrets {
		k := m.key(s)
		m.byKey[k] = append(m.byKey[k], int32(i))
		h := hash(k)
		m.filter[h/64] |= 1 << (h % 64)
		m.first[s[0]] = true
		for n := 1; n < m.q; n++ {
			m.short[shortKey(s[:n])] = struct{}{}
		}
	}
	return m
}

// Bytes returns b with every secret masked. It returns b itself when b
// holds no secret, and a masked copy otherwise: b is never modified.
func (m *Masker) Bytes(b []byte) []byte {
	if m == nil || len(m.secrets) == 0 {
		return b
	}
	var arr [4]span
	spans := m.find(b, arr[:0])
	if len(spans) == 0 {
		return b
	}
	out := bytes.Clone(b)
	for _, sp := range spans {
		fill(out[sp.s:sp.e])
	}
	return out
}

// String is Bytes for a string.
func (m *Masker) String(s string) string {
	if m == nil || len(m.secrets) == 0 {
		return s
	}
	// Only read: find does not keep or modify b.
	b := unsafe.Slice(unsafe.StringData(s), len(s))
	var arr [4]span
	spans := m.find(b, arr[:0])
	if len(spans) == 0 {
		return s
	}
	out := []byte(s)
	for _, sp := range spans {
		fill(out[sp.s:sp.e])
	}
	return string(out)
}

// Contains reports whether b holds any secret.
func (m *Masker) Contains(b []byte) bool {
	if m == nil || len(m.secrets) == 0 {
		return false
	}
	var arr [1]span
	return len(m.find(b, arr[:0])) > 0
}

func fill(b []byte) {
	for i := range b {
		b[i] = maskByte
	}
}

// find appends to spans every occurrence of every secret in b, as ranges
// that together cover exactly the bytes to mask (they may overlap).
func (m *Masker) find(b []byte, spans []span) []span {
	if !m.indexed {
		for _, sec := range m.secrets {
			for off := 0; ; {
				i := bytes.Index(b[off:], sec)
				if i < 0 {
					break
				}
				off += i
				spans = addSpan(spans, off, off+len(sec))
				off++ // occurrences of one secret may overlap ("aa" in "aaa")
			}
		}
		return spans
	}
	last := len(b) - m.q // last position a secret can start at
	qmask, filter := m.qmask, &m.filter
	i := 0
	for ; i <= last && i+8 <= len(b); i++ {
		k := binary.LittleEndian.Uint64(b[i:i+8:i+8]) & qmask
		if h := hash(k); filter[h/64]&(1<<(h%64)) != 0 {
			spans = m.verify(b, i, k, spans)
		}
	}
	for ; i <= last; i++ { // the last 7 bytes, where 8 cannot be loaded
		k := m.key(b[i:])
		if h := hash(k); m.filter[h/64]&(1<<(h%64)) != 0 {
			spans = m.verify(b, i, k, spans)
		}
	}
	return spans
}

// verify appends the secrets whose first q bytes are k and that start at i.
func (m *Masker) verify(b []byte, i int, k uint64, spans []span) []span {
	for _, idx := range m.byKey[k] {
		if sec := m.secrets[idx]; bytes.HasPrefix(b[i:], sec) {
			spans = addSpan(spans, i, i+len(sec))
		}
	}
	return spans
}

// addSpan appends [s, e), merged into the last span when they overlap, so a
// run of occurrences costs one span.
func addSpan(spans []span, s, e int) []span {
	if n := len(spans) - 1; n >= 0 && s >= spans[n].s && s <= spans[n].e {
		spans[n].e = max(spans[n].e, e)
		return spans
	}
	return append(spans, span{s, e})
}

// holdFrom returns where the longest tail of b that is a proper prefix of a
// secret starts (len(b) if there is none): the bytes a later read could
// complete into a secret.
func (m *Masker) holdFrom(b []byte) int {
	for s := max(0, len(b)-(m.maxLen-1)); s < len(b); s++ {
		if m.first[b[s]] && m.isProperPrefix(b[s:]) {
			return s
		}
	}
	return len(b)
}

// isProperPrefix reports whether t is a prefix of a longer secret.
func (m *Masker) isProperPrefix(t []byte) bool {
	if len(t) < m.q {
		_, ok := m.short[shortKey(t)]
		return ok
	}
	k := m.key(t)
	if h := hash(k); m.filter[h/64]&(1<<(h%64)) == 0 {
		return false
	}
	for _, idx := range m.byKey[k] {
		if sec := m.secrets[idx]; len(sec) > len(t) && bytes.HasPrefix(sec, t) {
			return true
		}
	}
	return false
}

// key reads the first q bytes of b (len(b) >= q) as a little-endian uint64.
func (m *Masker) key(b []byte) uint64 {
	if len(b) >= 8 {
		return binary.LittleEndian.Uint64(b) & m.qmask
	}
	var k uint64
	for j := range m.q {
		k |= uint64(b[j]) << (8 * j)
	}
	return k
}

// shortKey packs a prefix of 1 to 7 bytes with its length in the top byte,
// so "ab" and "ab\x00" differ.
func shortKey(b []byte) uint64 {
	k := uint64(len(b)) << 56
	for j, c := range b {
		k |= uint64(c) << (8 * j)
	}
	return k
}

// hash maps a key to a bit of the filter (Fibonacci hashing).
func hash(k uint64) uint64 {
	return (k * 0x9E3779B97F4A7C15) >> (64 - filterBits)
}
