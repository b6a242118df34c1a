package models

import (
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgtype"
)

// TestBatchValuesGoToPgxWithoutACopyEach: pgx encodes a batch column and
// a request-log row with no allocation per value. A []string column, or
// the row's values put in interfaces, cost one allocation per string, time
// and integer above 255 (issue 15).
func TestBatchValuesGoToPgxWithoutACopyEach(t *testing.T) {
	m := pgtype.NewMap()
	buf := make([]byte, 0, 64<<10)
	encodeAllocs := func(oid uint32, v any) float64 {
		t.Helper()
		if _, err := m.Encode(oid, pgtype.BinaryFormatCode, v, buf[:0]); err != nil {
			t.Fatalf("encode %T: %v", v, err)
		}
		return testing.AllocsPerRun(20, func() { _, _ = m.Encode(oid, pgtype.BinaryFormatCode, v, buf[:0]) })
	}
	columnsOf := func(n int) map[string]struct {
		oid uint32
		v   any
	} {
		text, ints, flags, bodies := columns[pgText](1, n)[0], columns[pgInt8](1, n)[0], make(column[pgBool], n), make(column[pgBytea], n)
		for i := range n {
			text[i], ints[i], flags[i], bodies[i] = pgText(strconv.Itoa(i)), pgInt8(1000+i), i%2 == 0, []byte(strconv.Itoa(i))
		}
		return map[string]struct {
			oid uint32
			v   any
		}{
			"text[]":   {pgtype.TextArrayOID, text},
			"bigint[]": {pgtype.Int8ArrayOID, ints},
			"int[]":    {pgtype.Int4ArrayOID, ints},
			"bool[]":   {pgtype.BoolArrayOID, flags},
			"bytea[]":  {pgtype.ByteaArrayOID, bodies},
		}
	}
	one, many := columnsOf(1), columnsOf(64)
	for name := range one {
		if a, b := encodeAllocs(one[name].oid, one[name].v), encodeAllocs(many[name].oid, many[name].v); b > a {
			t.Errorf("%s: %.0f allocations for 1 element, %.0f for 64", name, a, b)
		}
	}

	const i = 7
	r := RequestLog{CreatedAt: time.Now(), Client: "c-" + strconv.Itoa(i), Method: "POST", Path: "/v1/chat/completions",
		Model: "gpt-4o-mini", Stream: true, Status: 200, Outcome: OutcomeProxied, DurationMs: 1234, TTFBMs: 567,
		RequestBytes: 890, ResponseBytes: 4321, PromptTokens: 300, CompletionTokens: 400, TotalTokens: 700,
		CostMicros: 9999, UpstreamRequestID: "req_" + strconv.Itoa(i), IdempotencyKey: "k-" + strconv.Itoa(i),
		ClientIP: "203.0.113.9", UserAgent: "agent/" + strconv.Itoa(i)}
	oids := map[string]uint32{"created_at": pgtype.TimestamptzOID, "stream": pgtype.BoolOID, "status": pgtype.Int4OID}
	row := requestLogPointers(nil, &r)
	for i, name := range requestLogColumns {
		oid, ok := oids[name]
		if !ok {
			oid = pgtype.Int8OID
			if _, isText := row[i].(*pgText); isText {
				oid = pgtype.TextOID
			}
		}
		if n := encodeAllocs(oid, row[i]); n > 0 {
			t.Errorf("request log column %s: %.0f allocations to encode", name, n)
		}
	}
}
