package scrub

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zlib"
	"github.com/klauspost/compress/zstd"
	brrr "github.com/molecule-man/go-brrr"
)

// encoders compress with each coding Decode knows ("deflate-raw" is the
// headerless deflate some servers send as "deflate").
var encoders = map[string]func(io.Writer) io.WriteCloser{
	"gzip":        func(w io.Writer) io.WriteCloser { return gzip.NewWriter(w) },
	"deflate":     func(w io.Writer) io.WriteCloser { return zlib.NewWriter(w) },
	"deflate-raw": func(w io.Writer) io.WriteCloser { z, _ := flate.NewWriter(w, flate.DefaultCompression); return z },
	"br":          func(w io.Writer) io.WriteCloser { z, _ := brrr.NewWriter(w, 5); return z },
	"zstd":        func(w io.Writer) io.WriteCloser { z, _ := zstd.NewWriter(w); return z },
}

func encode(t testing.TB, coding string, data []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := encoders[coding](&buf)
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// header is the Content-Encoding an encoder's output is sent under.
func header(coding string) string {
	return strings.TrimSuffix(coding, "-raw")
}

func decodeAll(t *testing.T, contentEncoding string, body []byte, limit int64) ([]byte, error) {
	t.Helper()
	r, err := Decode(contentEncoding, bytes.NewReader(body), limit)
	if err != nil {
		t.Fatalf("Decode(%q): %v", contentEncoding, err)
	}
	got, err := io.ReadAll(r)
	if cerr := r.Close(); cerr != nil {
		t.Errorf("Close: %v", cerr)
	}
	return got, err
}

var sse = []byte(strings.Repeat("data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n", 200) + "data: [DONE]\n\n")

func TestDecode(t *testing.T) {
	for coding := range encoders {
		t.Run(coding, func(t *testing.T) {
			got, err := decodeAll(t, header(coding), encode(t, coding, sse), 1<<20)
			if err != nil || !bytes.Equal(got, sse) {
				t.Fatalf("decoded %d bytes, %v; want %d", len(got), err, len(sse))
			}
		})
	}
}

func TestDecodeSeveralCodings(t *testing.T) {
	// "gzip, br": gzip was applied first, so br is undone first.
	body := encode(t, "br", encode(t, "gzip", sse))
	got, err := decodeAll(t, "gzip, br", body, 1<<20)
	if err != nil || !bytes.Equal(got, sse) {
		t.Fatalf("decoded %d bytes, %v", len(got), err)
	}
	// Case, spaces and identity do not matter.
	got, err = decodeAll(t, " GZIP ,identity,Br", body, 1<<20)
	if err != nil || !bytes.Equal(got, sse) {
		t.Fatalf("decoded %d bytes, %v", len(got), err)
	}
}

func TestDecodeBomb(t *testing.T) {
	const limit = 1 << 20
	zeros := make([]byte, 64<<20)
	for coding := range encoders {
		t.Run(coding, func(t *testing.T) {
			bomb := encode(t, coding, zeros)
			got, err := decodeAll(t, header(coding), bomb, limit)
			if !errors.Is(err, ErrTooLarge) || len(got) != limit {
				t.Fatalf("%d compressed bytes: decoded %d, %v; want %d then ErrTooLarge", len(bomb), len(got), err, limit)
			}
			// Exactly at the bound is not a bomb.
			if got, err := decodeAll(t, header(coding), encode(t, coding, zeros[:limit]), limit); err != nil || len(got) != limit {
				t.Fatalf("at the bound: decoded %d, %v", len(got), err)
			}
		})
	}
	t.Run("nested", func(t *testing.T) {
		// Nested codings are bounded too.
		bomb := encode(t, "gzip", encode(t, "gzip", zeros))
		if got, err := decodeAll(t, "gzip, gzip", bomb, limit); !errors.Is(err, ErrTooLarge) {
			t.Fatalf("decoded %d, %v", len(got), err)
		}
	})
}

func TestDecodeErrors(t *testing.T) {
	for _, ce := range []string{"compress", "gzip, lzma", "x-unknown"} {
		if _, err := Decode(ce, strings.NewReader("x"), 1<<20); !errors.Is(err, ErrUnsupportedEncoding) {
			t.Errorf("Decode(%q) = %v, want ErrUnsupportedEncoding", ce, err)
		}
	}
	if _, err := Decode("gzip", strings.NewReader("x"), 0); err == nil {
		t.Error("Decode with no bound succeeded")
	}
	for coding := range encoders {
		body := encode(t, coding, sse)
		corrupt := bytes.Clone(body)
		corrupt[len(corrupt)/2] ^= 0xff
		for name, b := range map[string][]byte{"truncated": body[:len(body)/2], "corrupt": corrupt} {
			if got, err := decodeAll(t, header(coding), b, 1<<20); err == nil {
				t.Errorf("%s %s: decoded %d bytes without an error", name, coding, len(got))
			}
		}
	}
}

func TestDecodeIdentity(t *testing.T) {
	for _, ce := range []string{"", "identity", " , "} {
		got, err := decodeAll(t, ce, sse, 1)
		if err != nil || !bytes.Equal(got, sse) {
			t.Errorf("%q: %d bytes, %v", ce, len(got), err)
		}
	}
}

func TestDecodeEmptyBody(t *testing.T) {
	for _, ce := range []string{"gzip", "deflate", "zstd"} {
		if got, err := decodeAll(t, ce, nil, 1<<20); err != nil || len(got) != 0 {
			t.Errorf("%s: %q, %v", ce, got, err)
		}
	}
}

// TestDecodeThenMask is the proxy's use: an echoing upstream's gzip SSE,
// decoded and masked, no longer holds the key.
func TestDecodeThenMask(t *testing.T) {
	echo := append(bytes.Clone(sse), "data: {\"echo\":\"Bearer "+key+"\"}\n\ndata: [DONE]\n\n"...)
	gz := encode(t, "gzip", echo)
	if bytes.Contains(gz, []byte(key)) {
		t.Fatal("the test needs a body whose compressed bytes hide the key")
	}
	d, err := Decode("gzip", iotest.OneByteReader(bytes.NewReader(gz)), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	got, err := readAll(New(key).Reader(d), 5)
	if err != nil || bytes.Contains(got, []byte(key)) || len(got) != len(echo) {
		t.Fatalf("%q, %v", got, err)
	}
}
