package app_test

import (
	"context"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fasthttp/websocket"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// TestDashboardShowsWebSocketSessions: a real session lands in the request
// log, marked as a WebSocket in the list and on its detail page, with
// how it closed.
func TestDashboardShowsWebSocketSessions(t *testing.T) {
	up := apptest.NewWSUpstream(t)
	px := apptest.Start(t, up.URL+"/v1", map[string]string{"ADMIN_PASSWORD": adminPassword})
	c, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(px.URL, "http")+"/v1/realtime?model=gpt-realtime",
		http.Header{"Authorization": {"Bearer " + apptest.ClientKey}})
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, _, _ = c.ReadMessage()
	_ = c.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
	for {
		if _, _, err := c.ReadMessage(); err != nil {
			break
		}
	}
	_ = c.Close()
	var id int64
	apptest.Eventually(t, 10*time.Second, func() bool {
		page, err := px.App.Store.ListRequestLogs(context.Background(), models.LogFilter{Path: "/v1/realtime"})
		if err != nil || len(page.Logs) == 0 {
			return false
		}
		id = page.Logs[0].ID
		return true
	}, "no row for the session")

	b := newBrowser(t, px)
	b.login()
	list := b.page("/dashboard/requests")
	contains(t, "requests", list, "/v1/realtime", `title="WebSocket session">websocket</span>`)
	detail := b.page("/dashboard/requests/" + strconv.FormatInt(id, 10))
	contains(t, "request detail", detail, "WebSocket session", "closed 1000 by client", "gpt-realtime")
}
