package proxy

import (
	"bufio"
	"bytes"
	"io"
)

// coalesced reads a chunked upstream body so that chunks which have
// already arrived go to the client together: fasthttp returns one chunk
// per Read, and the server writes and flushes every Read, so a burst of
// small SSE chunks would cost a write to the client each. After a chunk it
// goes on reading only while the next chunk is complete in the reader's
// buffer — that Read cannot wait for the network — so nothing is held
// back that has arrived: an event the upstream sent alone still goes out
// alone, at once.
type coalesced struct {
	body io.Reader     // the upstream body stream, chunked
	br   *bufio.Reader // what body reads from
}

func (c *coalesced) Read(p []byte) (int, error) {
	n, err := c.body.Read(p)
	for err == nil && n > 0 && n < len(p) && chunkBuffered(c.br) {
		var m int
		m, err = c.body.Read(p[n:])
		n += m
	}
	return n, err
}

var crlf = []byte("\r\n")

// chunkBuffered reports whether br holds the next chunk of a chunked body
// whole: its size line, its data and the CRLF after it (for the last,
// empty chunk, the empty line that ends it). Anything it does not
// understand is left to the body's own parser.
func chunkBuffered(br *bufio.Reader) bool {
	b, _ := br.Peek(br.Buffered()) // no I/O: only what is buffered
	line := bytes.Index(b, crlf)
	if line <= 0 {
		return false
	}
	sizeText, _, _ := bytes.Cut(b[:line], []byte(";")) // extensions aside
	size, ok := chunkSize(sizeText)
	if !ok {
		return false
	}
	rest := b[line+2:]
	if size == 0 {
		return bytes.HasPrefix(rest, crlf) // no trailers
	}
	return len(rest) >= size+2
}

// chunkSize parses a chunk size: 1 to 7 hex digits (larger chunks than
// that never fit the buffer).
func chunkSize(hex []byte) (int, bool) {
	if len(hex) == 0 || len(hex) > 7 {
		return 0, false
	}
	size := 0
	for _, ch := range hex {
		var d byte
		switch {
		case '0' <= ch && ch <= '9':
			d = ch - '0'
		case 'a' <= ch && ch <= 'f':
			d = ch - 'a' + 10
		case 'A' <= ch && ch <= 'F':
			d = ch - 'A' + 10
		default:
			return 0, false
		}
		size = size<<4 | int(d)
	}
	return size, true
}
