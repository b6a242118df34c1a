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
	"sync"
	"unsafe"
)

// maskByte replaces every byte of a secret.
const maskByte = '*'

// fewSecrets is how many secrets are still searched one bytes.Index pass
// each; above it one pass with a hashed prefix filter is faster
// (BenchmarkStrategy on 64 KiB of SSE: at 4 secrets 2.3 GB/s one pass each
// against 1.1 GB/s filtered; they meet near 8; at 200, 40 MB/s against 1.1 GB/s).
const fewSecrets = 4

// keyLen is the length of the prefix the filter indexes secrets by: one
// little-endian uint64. Shorter secrets are searched one pass each.
const keyLen = 8

// filterBits is log2 of the prefix filter's size in bits (8 KiB): with a few
// hundred secrets almost every position fails it on one bit test.
const filterBits = 16

// Masker masks a fixed set of secrets. It is immutable after New and safe
// for concurrent use. A nil *Masker masks nothing.
type Masker struct {
	secrets [][]byte
	minLen  int // shorter inputs hold no secret: most header values and log fields
	maxLen  int
	each    [][]byte // searched with one bytes.Index pass each
	filter  bool     // the other secrets are searched with the filter

	// Secrets of keyLen bytes or more, indexed by their first keyLen bytes.
	byKey    map[uint64][][]byte
	prefixes map[uint64]struct{} // their prefixes shorter than keyLen, tagged with their length
	bits     [1 << filterBits / 64]uint64
	first    [256]bool // bytes a secret starts with

	buffers sync.Pool // *[]byte of maxLen-1+readChunk, for Readers
}

// span is the half-open range [s, e) of one or more overlapping occurrences.
type span struct{ s, e int }

// New returns a Masker for the given secrets. Empty and repeated secrets are
// ignored.
func New(secrets ...string) *Masker {
	return newMasker(secrets, fewSecrets)
}

// newMasker searches every secret one pass each when there are at most few.
func newMasker(secrets []string, few int) *Masker {
	m := &Masker{byKey: map[uint64][][]byte{}, prefixes: map[uint64]struct{}{}}
	seen := map[string]bool{}
	for _, s := range secrets {
		if s == "" || seen[s] {
			continue
		}
		seen[s] = true
		m.secrets = append(m.secrets, []byte(s))
		m.maxLen = max(m.maxLen, len(s))
		if m.minLen == 0 || len(s) < m.minLen {
			m.minLen = len(s)
		}
	}
	for _, s := range m.secrets {
		m.first[s[0]] = true
		if len(m.secrets) <= few || len(s) < keyLen {
			m.each = append(m.each, s)
		} else {
			m.filter = true
		}
		if len(s) < keyLen {
			continue
		}
		k := binary.LittleEndian.Uint64(s)
		m.byKey[k] = append(m.byKey[k], s)
		h := hash(k)
		m.bits[h/64] |= 1 << (h % 64)
		for n := 1; n < keyLen; n++ {
			m.prefixes[shortKey(s[:n])] = struct{}{}
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
	if len(b) < m.minLen {
		return spans
	}
	for _, sec := range m.each {
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
	if !m.filter {
		return spans
	}
	bits := &m.bits
	for i := 0; i+keyLen <= len(b); i++ {
		k := binary.LittleEndian.Uint64(b[i : i+keyLen : i+keyLen])
		if h := hash(k); bits[h/64]&(1<<(h%64)) != 0 {
			// With the filter on, byKey holds exactly the secrets not in each.
			for _, sec := range m.byKey[k] {
				if bytes.HasPrefix(b[i:], sec) {
					spans = addSpan(spans, i, i+len(sec))
				}
			}
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
	for _, sec := range m.each {
		if len(sec) < keyLen && len(sec) > len(t) && bytes.HasPrefix(sec, t) {
			return true
		}
	}
	if len(t) < keyLen {
		_, ok := m.prefixes[shortKey(t)]
		return ok
	}
	k := binary.LittleEndian.Uint64(t)
	if h := hash(k); m.bits[h/64]&(1<<(h%64)) == 0 {
		return false
	}
	for _, sec := range m.byKey[k] {
		if len(sec) > len(t) && bytes.HasPrefix(sec, t) {
			return true
		}
	}
	return false
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
