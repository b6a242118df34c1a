package scrub

import (
	"bytes"
	"io"
	"strings"
	"testing"
)

// FuzzMask: whatever the secrets and however the input is split into source
// reads and caller buffers, the Reader gives what Bytes gives, which is the
// naive reference, as long as the input, and no secret survives.
//
// secrets is a comma-separated list ('*', the mask byte, is removed: see the
// package doc); each byte of cuts sizes one source read and one caller
// buffer in turn.
func FuzzMask(f *testing.F) {
	f.Add([]byte("data: {\"k\":\"sk-abcdef\"}\n\n"), "sk-abcdef", []byte{3, 1, 200})
	f.Add([]byte("xabababx"), "abab,bab", []byte{1})
	f.Add([]byte("abcdef-sk-ab-sk-abcd"), "abcd,cdef,sk-abc,sk-abcd", []byte{2, 2, 1})
	f.Add([]byte("aaaaaaaaaa"), "a,aa,aaa,b,c,d", []byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, in []byte, secrets string, cuts []byte) {
		list := strings.Split(strings.ReplaceAll(secrets, "*", ""), ",")
		want := naive(list, in)
		for strategy, m := range strategies(list) {
			if got := m.Bytes(in); !bytes.Equal(got, want) {
				t.Fatalf("%s: Bytes = %q, want %q", strategy, got, want)
			}
			got, err := readCuts(m.Reader(&cutReader{in: in, cuts: cuts}), cuts)
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("%s: Reader = %q, %v; want %q", strategy, got, err, want)
			}
		}
		for _, s := range list {
			if s != "" && bytes.Contains(want, []byte(s)) {
				t.Fatalf("secret %q survives in %q", s, want)
			}
		}
	})
}

// cutReader serves in with read sizes taken from cuts.
type cutReader struct {
	in   []byte
	cuts []byte
	i    int
}

func (c *cutReader) Read(p []byte) (int, error) {
	if len(c.in) == 0 {
		return 0, io.EOF
	}
	size := len(p)
	if len(c.cuts) > 0 {
		size = min(size, 1+int(c.cuts[c.i%len(c.cuts)]))
		c.i++
	}
	n := copy(p[:size], c.in)
	c.in = c.in[n:]
	return n, nil
}

// readCuts reads r to the end with buffer sizes taken from cuts, in reverse
// order so they differ from the source's.
func readCuts(r io.Reader, cuts []byte) ([]byte, error) {
	var out []byte
	buf := make([]byte, 256)
	for i := 0; ; i++ {
		size := len(buf)
		if len(cuts) > 0 {
			size = 1 + int(cuts[len(cuts)-1-i%len(cuts)])
		}
		n, err := r.Read(buf[:size])
		out = append(out, buf[:n]...)
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
	}
}
