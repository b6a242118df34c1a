package scrub

import (
	"errors"
	"io"
)

// readChunk bounds one read from the source. Reads are also bounded by the
// caller's buffer, so each Read maps to one source read.
const readChunk = 16 << 10

// reader masks secrets in a stream; see Masker.Reader.
type reader struct {
	m   *Masker
	src io.Reader
	err error // the source's error, returned once the held bytes are out

	buf []byte // out, then held; *pooled until Release
	// pooled is the pool's pointer to buf, put back as it came: a new
	// pointer would cost an allocation per stream.
	pooled *[]byte
	out    []byte // masked bytes not yet returned
	held   []byte // original bytes that may start a secret
	// heldMask is how many leading bytes of held an occurrence already
	// found covers: they are masked when released.
	heldMask int
	spans    []span // reused between reads
}

// Reader returns a reader that yields src with every secret masked, with
// exactly as many bytes as src. It holds back only a tail that could still
// grow into a secret, so it adds no latency otherwise. Its buffer comes
// from a pool: pass the reader to Release once it is no longer read, or
// leave it to the garbage collector. Use one per stream: it is not safe for
// concurrent use. With no secrets it returns src.
func (m *Masker) Reader(src io.Reader) io.Reader {
	if m == nil || len(m.secrets) == 0 {
		return src
	}
	buf, _ := m.buffers.Get().(*[]byte)
	if buf == nil {
		b := make([]byte, m.maxLen-1+readChunk)
		buf = &b
	}
	return &reader{m: m, src: src, buf: *buf, pooled: buf}
}

var errReleased = errors.New("scrub: read after Release")

// Release gives the buffer of a reader from Masker.Reader back for another
// one; the reader then fails every Read. Any other reader is left alone.
func Release(r io.Reader) {
	rd, ok := r.(*reader)
	if !ok || rd.buf == nil {
		return
	}
	pooled := rd.pooled
	rd.buf, rd.pooled, rd.out, rd.held, rd.err = nil, nil, nil, nil, errReleased
	rd.m.buffers.Put(pooled)
}

// Read returns masked bytes as soon as they are known not to start a secret.
// It returns the source's error (io.EOF included) after the last byte.
func (r *reader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for len(r.out) == 0 {
		if r.err != nil {
			return 0, r.err
		}
		r.fill(len(p))
	}
	n := copy(p, r.out)
	r.out = r.out[n:]
	return n, nil
}

// fill reads once from the source (at most want new bytes when that leaves
// room for the held tail) and moves what can no longer start a secret,
// masked, from held to out.
func (r *reader) fill(want int) {
	h := copy(r.buf, r.held) // out is empty: the held tail moves to the front
	n, err := r.src.Read(r.buf[h : h+min(readChunk, max(want-h, 1))])
	if n == 0 && err == nil {
		r.held = r.buf[:h]
		return
	}
	b := r.buf[:h+n]
	rel := len(b)
	if err == nil {
		rel = r.m.holdFrom(b)
	} else {
		// Nothing can follow: release everything.
		r.err = err
	}
	// An occurrence that began in bytes already released still covers the
	// head of held; occurrences that start in held are found again next time.
	// Masks are written once every occurrence is found.
	spans := r.m.find(b, r.spans[:0])
	carry := r.heldMask
	fill(b[:min(carry, rel)])
	r.heldMask = max(0, carry-rel)
	for _, sp := range spans {
		if sp.s < rel {
			fill(b[sp.s:min(sp.e, rel)])
			r.heldMask = max(r.heldMask, sp.e-rel)
		}
	}
	r.spans = spans[:0]
	r.out, r.held = b[:rel], b[rel:]
}
