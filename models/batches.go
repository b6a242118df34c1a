package models

import (
	"strconv"
	"strings"
	"time"
)

// inBatches runs one bounded delete (at most batch rows) until it deletes
// fewer than batch rows, so a large backlog never holds one long lock, and
// returns how many rows went.
func inBatches(batch int, deleteOnce func(batch int) (int64, error)) (int64, error) {
	var total int64
	for {
		n, err := deleteOnce(batch)
		total += n
		if err != nil || n < int64(batch) {
			return total, err
		}
	}
}

// A keyset cursor is a row's position in a newest-first list:
// "<unix nanoseconds of created_at>.<id>".

func encodeCursor(at time.Time, id string) string {
	return strconv.FormatInt(at.UnixNano(), 10) + "." + id
}

// decodeCursor reads a cursor whose id passes validID.
func decodeCursor(c string, validID func(string) bool) (time.Time, string, bool) {
	ns, id, ok := strings.Cut(c, ".")
	n, err := strconv.ParseInt(ns, 10, 64)
	if !ok || err != nil || !validID(id) {
		return time.Time{}, "", false
	}
	return time.Unix(0, n).UTC(), id, true
}
