package scrub

import (
	"bytes"
	"errors"
	"io"
	"strings"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zlib"
	"github.com/klauspost/compress/zstd"
	brrr "github.com/molecule-man/go-brrr"
)

// ErrTooLarge is returned by a decoded stream that grows past its bound.
var ErrTooLarge = errors.New("scrub: decoded body exceeds the limit")

// ErrUnsupportedEncoding is returned by Decode for a Content-Encoding it
// does not know. The error does not quote the header: an upstream controls
// it, and it could carry a secret into a log.
var ErrUnsupportedEncoding = errors.New("scrub: unsupported content encoding")

// zstdMaxWindow is the largest zstd window accepted: the 8 MiB RFC 8878
// asks HTTP decoders to support, so a frame cannot claim gigabytes.
const zstdMaxWindow = 8 << 20

// Decode returns body with the codings of a Content-Encoding header value
// undone (gzip, x-gzip, deflate, br, zstd; identity; several, separated by
// commas, are undone last first). Each decoding stage fails with
// ErrTooLarge once it yields more than maxBytes, which stops decompression
// bombs. A body without coding ("" or "identity") is returned as it is.
//
// Decode fails only for an unknown coding or a non-positive maxBytes; it
// reads nothing, and corrupt data is reported by Read. Close releases the
// decoders and returns nil; it does not close body.
func Decode(contentEncoding string, body io.Reader, maxBytes int64) (io.ReadCloser, error) {
	if maxBytes <= 0 {
		return nil, errors.New("scrub: Decode needs a positive maxBytes")
	}
	var codings []string
	for c := range strings.SplitSeq(contentEncoding, ",") {
		c = strings.ToLower(strings.TrimSpace(c))
		switch c {
		case "", "identity":
		case "gzip", "x-gzip", "deflate", "br", "zstd":
			codings = append(codings, c)
		default:
			return nil, ErrUnsupportedEncoding
		}
	}
	if len(codings) == 0 {
		return io.NopCloser(body), nil
	}
	d := &decoder{}
	r := body
	for i := len(codings) - 1; i >= 0; i-- {
		s := &stage{coding: codings[i], src: r, left: maxBytes}
		d.stages = append(d.stages, s)
		r = s
	}
	d.Reader = r
	return d, nil
}

// decoder is the last of a chain of stages, and closes them all.
type decoder struct {
	io.Reader
	stages []*stage
}

// Close releases the decoders. A decoding error was already returned by
// Read, so Close itself always returns nil.
func (d *decoder) Close() error {
	for _, s := range d.stages {
		if s.dec != nil {
			_ = s.dec.Close()
		}
	}
	return nil
}

// stage undoes one coding, bounded to left bytes. Its decoder is made on
// the first Read, so Decode itself never blocks on the body.
type stage struct {
	coding string
	src    io.Reader
	dec    io.ReadCloser
	left   int64
	err    error
}

func (s *stage) Read(p []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	if s.dec == nil {
		if s.dec, s.err = open(s.coding, s.src); s.err != nil {
			return 0, s.err
		}
	}
	if s.left <= 0 {
		// At the bound: fine if the stream ends here, a bomb otherwise.
		var one [1]byte
		n, err := s.dec.Read(one[:])
		switch {
		case n > 0:
			s.err = ErrTooLarge
		case err != nil:
			s.err = err
		}
		return 0, s.err
	}
	if int64(len(p)) > s.left {
		p = p[:s.left]
	}
	n, err := s.dec.Read(p)
	s.left -= int64(n)
	if err != nil {
		s.err = err
	}
	return n, err
}

func open(coding string, src io.Reader) (io.ReadCloser, error) {
	switch coding {
	case "gzip", "x-gzip":
		z, err := gzip.NewReader(src)
		if err != nil {
			return nil, err // not z: a nil *gzip.Reader in an interface is not nil
		}
		return z, nil
	case "deflate":
		return openDeflate(src)
	case "br":
		return brrr.NewReader(src), nil
	case "zstd":
		d, err := zstd.NewReader(src, zstd.WithDecoderConcurrency(1),
			zstd.WithDecoderLowmem(true), zstd.WithDecoderMaxWindow(zstdMaxWindow))
		if err != nil {
			return nil, err
		}
		return d.IOReadCloser(), nil
	}
	panic("scrub: no decoder for " + coding) // Decode accepts only the codings above
}

// openDeflate accepts both forms of "deflate": the zlib stream RFC 9110
// names, and the raw deflate some servers send instead.
func openDeflate(src io.Reader) (io.ReadCloser, error) {
	var hdr [2]byte
	n, err := io.ReadFull(src, hdr[:])
	if n == 0 {
		return nil, err // io.EOF for an empty body, as gzip and zstd give
	}
	src = io.MultiReader(strings.NewReader(string(hdr[:n])), src)
	// A zlib header: method 8 and a check making the pair a multiple of 31.
	if n == 2 && hdr[0]&0x0f == 8 && (uint16(hdr[0])<<8|uint16(hdr[1]))%31 == 0 {
		return zlib.NewReader(src)
	}
	return flate.NewReader(src), nil
}

// Gunzip decompresses a gzip body held in memory, at most limit bytes of
// it: over reports that more followed. On a corrupt or cut stream it
// returns what decompressed before the error, and the error.
func Gunzip(body []byte, limit int64) (plain []byte, over bool, err error) {
	z, err := gzip.NewReader(bytes.NewReader(body))
	if err != nil {
		return nil, false, err
	}
	plain, err = io.ReadAll(io.LimitReader(z, limit))
	if err != nil {
		return plain, false, err
	}
	var one [1]byte
	n, err := z.Read(one[:])
	if n > 0 {
		return plain, true, nil
	}
	if errors.Is(err, io.EOF) {
		err = nil
	}
	return plain, false, err
}
