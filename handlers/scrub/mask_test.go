package scrub

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"testing/iotest"
)

// naive masks every byte any occurrence of any secret covers, the obvious
// way: the reference the Masker must equal.
func naive(secrets []string, in []byte) []byte {
	out := bytes.Clone(in)
	for i := range in {
		for _, s := range secrets {
			if s != "" && bytes.HasPrefix(in[i:], []byte(s)) {
				fill(out[i : i+len(s)])
			}
		}
	}
	return out
}

// strategies returns the Masker for secrets searched both ways, so each
// test covers the one-pass-per-secret and the prefix-filter search.
func strategies(secrets []string) map[string]*Masker {
	return map[string]*Masker{"each": newMasker(secrets, len(secrets)), "filter": newMasker(secrets, 0)}
}

// chunks is a source that returns its chunks one per Read.
type chunks [][]byte

func (c *chunks) Read(p []byte) (int, error) {
	if len(*c) == 0 {
		return 0, io.EOF
	}
	n := copy(p, (*c)[0])
	if (*c)[0] = (*c)[0][n:]; len((*c)[0]) == 0 {
		*c = (*c)[1:]
	}
	return n, nil
}

func split(s string, at ...int) *chunks {
	var c chunks
	prev := 0
	for _, i := range append(at, len(s)) {
		c = append(c, []byte(s[prev:i]))
		prev = i
	}
	return &c
}

const key = "sk-proj-abcdefghijklmnop0123456789"

func TestMask(t *testing.T) {
	mask := func(n int) string { return strings.Repeat("*", n) }
	many := make([]string, 200)
	for i := range many {
		many[i] = fmt.Sprintf("client-key-%03d-xyzzy", i)
	}
	tests := []struct {
		name    string
		secrets []string
		in      string
		want    string
	}{
		{"no secret", []string{key}, "data: {\"x\":1}\n\n", "data: {\"x\":1}\n\n"},
		{"empty input", []string{key}, "", ""},
		{"no secrets configured", nil, "data: " + key, "data: " + key},
		{"empty secret ignored", []string{"", key}, "a" + key, "a" + mask(len(key))},
		{"whole input", []string{key}, key, mask(len(key))},
		{"at start", []string{key}, key + " tail", mask(len(key)) + " tail"},
		{"at end", []string{key}, "Bearer " + key, "Bearer " + mask(len(key))},
		{"middle", []string{key}, `{"auth":"` + key + `"}`, `{"auth":"` + mask(len(key)) + `"}`},
		{"twice adjacent", []string{key}, key + key, mask(2 * len(key))},
		{"prefix only is kept", []string{key}, key[:20] + "\n\n", key[:20] + "\n\n"},
		{"self-overlapping", []string{"abab"}, "xababab", "x******"},
		{"overlapping secrets", []string{"abcd", "cdef"}, "-abcdef-", "-******-"},
		{"prefix of another", []string{"sk-abc", "sk-abcdef"}, "sk-abcdef sk-abcx", "********* ******x"},
		{"contained in another", []string{"bcd", "abcde"}, "abcde bcd", "***** ***"},
		{"one byte secret", []string{"k"}, "kkxk", "**x*"},
		{"many: one found", many, "a client-key-137-xyzzy b", "a " + mask(20) + " b"},
		{"many: none", many, strings.Repeat("client-key-", 10), strings.Repeat("client-key-", 10)},
		{"many with the upstream key", append([]string{key}, many...), key + "client-key-000-xyzzy", mask(len(key) + 20)},
		{"short and long secrets", append([]string{"tok", "ab"}, many...), "tok client-key-007-xyzzyab", "*** **********************"},
		{"a short secret inside a long one", []string{"xyzzy", "client-key-1-xyzzy"}, "client-key-1-xyzz", "client-key-1-xyzz"},
		{"key next to a client key", []string{key, "client-key-1"}, "client-key-" + key, "client-key-" + mask(len(key))},
		{"input as long as the shortest secret", []string{key, "tok"}, "tok", "***"},
		{"input shorter than every secret", []string{key, "tok"}, "to", "to"},
	}
	for _, tt := range tests {
		if got := string(naive(tt.secrets, []byte(tt.in))); got != tt.want {
			t.Fatalf("%s: the reference gives %q, want %q", tt.name, got, tt.want)
		}
		for strategy, m := range strategies(tt.secrets) {
			t.Run(tt.name+"/"+strategy, func(t *testing.T) {
				if got := string(m.Bytes([]byte(tt.in))); got != tt.want {
					t.Errorf("Bytes = %q, want %q", got, tt.want)
				}
				if got := m.String(tt.in); got != tt.want {
					t.Errorf("String = %q, want %q", got, tt.want)
				}
				if got := m.Contains([]byte(tt.in)); got != (tt.in != tt.want) {
					t.Errorf("Contains = %v", got)
				}
				readers := map[string]func() io.Reader{
					"one read":         func() io.Reader { return strings.NewReader(tt.in) },
					"1-byte reads":     func() io.Reader { return iotest.OneByteReader(strings.NewReader(tt.in)) },
					"halves":           func() io.Reader { return split(tt.in, len(tt.in)/2) },
					"thirds":           func() io.Reader { return split(tt.in, len(tt.in)/3, 2*len(tt.in)/3) },
					"data with io.EOF": func() io.Reader { return iotest.DataErrReader(strings.NewReader(tt.in)) },
				}
				for name, src := range readers {
					for _, size := range []int{1, 3, 4096} {
						got, err := readAll(m.Reader(src()), size)
						if err != nil || string(got) != tt.want {
							t.Errorf("%s, %d-byte buffer: %q, %v; want %q", name, size, got, err, tt.want)
						}
					}
				}
			})
		}
	}
}

// readAll reads r to the end with a buffer of size bytes.
func readAll(r io.Reader, size int) ([]byte, error) {
	var out []byte
	buf := make([]byte, size)
	for {
		n, err := r.Read(buf)
		out = append(out, buf[:n]...)
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
	}
}

func TestBytesDoesNotModifyItsInput(t *testing.T) {
	m := New(key)
	in := []byte("x" + key)
	out := m.Bytes(in)
	if string(in) != "x"+key || string(out) == string(in) {
		t.Fatalf("in = %q, out = %q", in, out)
	}
	clean := []byte("nothing here")
	if out := m.Bytes(clean); &out[0] != &clean[0] {
		t.Error("a clean input was copied")
	}
}

func TestNilMasker(t *testing.T) {
	var m *Masker
	src := strings.NewReader(key)
	if m.String(key) != key || string(m.Bytes([]byte(key))) != key || m.Contains([]byte(key)) || m.Reader(src) != io.Reader(src) {
		t.Fatal("a nil Masker changed something")
	}
}

// steps is a source that serves one chunk per Read and records how many
// Reads it has served, so a test can see which masked Read each chunk left in.
type steps struct {
	chunks []string
	reads  int
}

func (s *steps) Read(p []byte) (int, error) {
	if s.reads == len(s.chunks) {
		return 0, io.EOF
	}
	s.reads++
	return copy(p, s.chunks[s.reads-1]), nil
}

// TestReaderLatency: bytes leave in the Read that brought them unless they
// may start a secret; held bytes leave as soon as they cannot.
func TestReaderLatency(t *testing.T) {
	tests := []struct {
		name   string
		chunks []string
		want   []string // what each masked Read returns, one source Read each
	}{
		{"SSE events pass at once", []string{"data: a\n\n", "data: b\n\n"}, []string{"data: a\n\n", "data: b\n\n"}},
		{"a partial key is held", []string{"data: " + key[:10], key[10:] + "\n\n"}, []string{"data: ", strings.Repeat("*", len(key)) + "\n\n"}},
		{"held bytes leave when they cannot start a key", []string{"data: sk-pr", "x\n\n"}, []string{"data: ", "sk-prx\n\n"}},
		{"only the longest possible start is held", []string{"sk-sk-pr", "oj-X"}, []string{"sk-", "sk-proj-X"}},
		{"a key over three reads", []string{"a" + key[:5], key[5:15], key[15:] + "b"}, []string{"a", "", strings.Repeat("*", len(key)) + "b"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := &steps{chunks: tt.chunks}
			r := New(key, "other-secret").Reader(src)
			buf := make([]byte, 4096)
			var got []string
			for src.reads < len(tt.chunks) {
				before := src.reads
				n, err := r.Read(buf)
				if err != nil {
					t.Fatal(err)
				}
				// An empty step means the Read needed a further source read.
				for range src.reads - before - 1 {
					got = append(got, "")
				}
				got = append(got, string(buf[:n]))
			}
			if fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Errorf("reads gave %q, want %q", got, tt.want)
			}
		})
	}
}

func TestReaderEndsWithTheSourceError(t *testing.T) {
	boom := errors.New("upstream reset")
	src := io.MultiReader(strings.NewReader("x"+key[:5]), iotest.ErrReader(boom))
	got, err := readAll(New(key).Reader(src), 64)
	if !errors.Is(err, boom) || string(got) != "x"+key[:5] {
		t.Fatalf("got %q, %v; want the held bytes, then %v", got, err, boom)
	}
}

func TestReaderSizes(t *testing.T) {
	// A body far larger than the buffer, secrets at every read boundary.
	m := New(key)
	var in strings.Builder
	for in.Len() < 200<<10 {
		in.WriteString(strings.Repeat("x", in.Len()%97) + key)
	}
	want := m.Bytes([]byte(in.String()))
	for _, size := range []int{7, 4096, 32 << 10, 1 << 20} {
		got, err := readAll(m.Reader(strings.NewReader(in.String())), size)
		if err != nil || !bytes.Equal(got, want) || bytes.Contains(got, []byte(key)) {
			t.Errorf("%d-byte reads: %d bytes, %v; want %d masked", size, len(got), err, len(want))
		}
	}
}

// TestReplacePerReadLeaks shows why the Reader holds tails: replacing the
// key in each read on its own, as the proxy did for error bodies, lets a key
// split over two reads through.
func TestReplacePerReadLeaks(t *testing.T) {
	in := "data: {\"echo\":\"" + key + "\"}\n\n"
	cut := strings.Index(in, key) + 10
	var naivePerRead []byte
	for _, part := range []string{in[:cut], in[cut:]} {
		naivePerRead = append(naivePerRead, bytes.ReplaceAll([]byte(part), []byte(key), []byte("***"))...)
	}
	if !bytes.Contains(naivePerRead, []byte(key)) {
		t.Fatal("per-read replacement caught the split key; the test shows nothing")
	}
	got, err := readAll(New(key).Reader(split(in, cut)), 4096)
	if err != nil || bytes.Contains(got, []byte(key)) || len(got) != len(in) {
		t.Fatalf("Reader gave %q, %v", got, err)
	}
}

// A released reader fails instead of reading a buffer another reader now uses.
func TestReaderRelease(t *testing.T) {
	m := New("sk-secret-0123456789")
	r := m.Reader(strings.NewReader("data: sk-secret-0123456789 and more\n\n"))
	var p [4]byte
	if _, err := r.Read(p[:]); err != nil {
		t.Fatal(err)
	}
	Release(r)
	if n, err := r.Read(p[:]); n != 0 || err == nil {
		t.Fatalf("read after Release: %d, %v", n, err)
	}
	Release(r) // twice is harmless
	next := m.Reader(strings.NewReader("sk-secret-0123456789"))
	if b, err := io.ReadAll(next); err != nil || string(b) != strings.Repeat("*", 20) {
		t.Fatalf("reader after a release: %q %v", b, err)
	}
}

// A reader's buffer goes back to the pool as it came, so a stream costs one
// allocation, the reader itself, and not the buffer's pointer too.
func TestReaderReleaseReusesTheBuffer(t *testing.T) {
	m := New("sk-secret-0123456789")
	src := strings.NewReader("")
	if allocs := testing.AllocsPerRun(100, func() { Release(m.Reader(src)) }); allocs > 1 {
		t.Errorf("Reader and Release: %.0f allocations, want 1", allocs)
	}
}
